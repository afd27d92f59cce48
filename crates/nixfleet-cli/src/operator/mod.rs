//! The commands that ask a running control plane (SPEC.md §8): `status` and `rollout`.
//! They read the operator routes over mTLS with an operator certificate and either
//! render text (see [`render`]) or print the API's JSON.

pub mod client;
pub mod compliance;
pub mod config;
pub mod dashboard;
pub mod render;

use std::path::PathBuf;

use nixfleet_proto::api::{
    Healthz, HostDetail, HostStatus, RolloutEventRecord, RolloutStatus, StatusReport,
};
use time::OffsetDateTime;

use self::client::OperatorClient;
use self::config::{Connection, ConnectionArgs};
use self::render::Style;

/// Every way an operator command fails, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("no {what} configured: pass {flag}, set {var}, or set `{key} = …` in {}", file.display())]
    NotConfigured {
        what: &'static str,
        flag: &'static str,
        var: &'static str,
        key: &'static str,
        file: PathBuf,
    },
    #[error("control-plane URL {url:?} must start with https:// (the operator API is served over mTLS only)")]
    BadUrl { url: String },
    #[error("cannot read the config file {}: {source}", path.display())]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {} is not valid: {detail} (keys: url, ca_cert, cert, key, timeout_secs)", path.display())]
    ConfigParse { path: PathBuf, detail: String },
    #[error("cannot read the {what} {}: {source} (operator certificates come from `nixfleet cert operator`; the fleet CA certificate is the ca.pem of `nixfleet ca init`)", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the operator credentials are unusable: {detail}")]
    Credentials { detail: String },
    #[error("cannot reach the control plane at {url}: {detail}{}{hint}", if hint.is_empty() { "" } else { "; " })]
    Unreachable {
        url: String,
        detail: String,
        hint: &'static str,
    },
    #[error("{url} gave no answer within {secs} s; is the control plane up? (raise --timeout-secs for a very large fleet)")]
    Timeout { url: String, secs: u64 },
    #[error("the control plane refused the operator certificate (401) at {url}: {message}; pass an operator certificate issued by this fleet's CA (`nixfleet cert operator`) that has not expired")]
    Unauthorized { url: String, message: String },
    #[error("the control plane refused access (403) at {url}: {message}; --cert must be an operator certificate, not a host certificate")]
    Forbidden { url: String, message: String },
    #[error("not found (404) at {url}: {message}")]
    NotFound { url: String, message: String },
    #[error("the control plane is not ready (503) at {url}: {message}; retry shortly")]
    Unavailable { url: String, message: String },
    #[error("the control plane answered {status} at {url}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("the answer from {url} is not what this nixfleet expects ({detail}); are the CLI and the control plane the same version?")]
    BadAnswer { url: String, detail: String },
    #[error("no rollout matches {query:?}; `nixfleet rollout list` shows them")]
    NoSuchRollout { query: String },
    #[error("{query:?} matches several rollouts ({}); give more of the id", candidates.join(", "))]
    AmbiguousRollout {
        query: String,
        candidates: Vec<String>,
    },
    #[error("{name:?} is not a host name (a-z, 0-9, '.', '-')")]
    BadName { name: String },
    #[error("cannot start the async runtime: {0}")]
    Runtime(String),
    #[error("{addr} is not a loopback address: the dashboard shows the fleet to anyone who reaches it, with the operator's certificate; use 127.0.0.1 or [::1], or pass --allow-remote to serve it anyway")]
    NotLoopback { addr: String },
    #[error("cannot listen on {addr}: {detail} (pick another --listen address or port)")]
    Listen { addr: String, detail: String },
}

impl OperatorError {
    pub fn from_status(url: String, status: u16, message: String) -> OperatorError {
        match status {
            401 => OperatorError::Unauthorized { url, message },
            403 => OperatorError::Forbidden { url, message },
            404 => OperatorError::NotFound { url, message },
            503 => OperatorError::Unavailable { url, message },
            _ => OperatorError::Status {
                url,
                status,
                message,
            },
        }
    }
}

/// What to ask the control plane.
#[derive(Debug, Clone)]
pub enum Query {
    Fleet,
    Host(String),
    Rollouts,
    Trace(String),
    /// `nixfleet compliance report`: optionally one channel, one framework.
    Compliance {
        channel: Option<String>,
        framework: Option<String>,
    },
    /// `nixfleet compliance evidence --host H`: the host's newest signed evidence.
    Evidence(String),
}

/// How to show it.
#[derive(Debug, Clone, Copy)]
pub struct Ui {
    pub json: bool,
    pub style: Style,
    /// Show a spinner on stderr while waiting.
    pub spinner: bool,
}

/// Runs `query` and returns what to print on stdout.
pub fn run(query: &Query, args: &ConnectionArgs, ui: Ui) -> Result<String, OperatorError> {
    let env = |name: &str| std::env::var(name).ok();
    let conn = config::resolve(args, &env)?;
    let client = OperatorClient::new(&conn)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| OperatorError::Runtime(e.to_string()))?;
    let spinner = ui.spinner.then(|| {
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(indicatif::ProgressStyle::default_spinner());
        bar.set_message(format!("asking {}", conn.url));
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        bar
    });
    let result = runtime.block_on(answer(query, &conn, &client, ui));
    if let Some(bar) = spinner {
        bar.finish_and_clear();
    }
    result
}

fn check_name(name: &str) -> Result<(), OperatorError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'));
    if ok {
        Ok(())
    } else {
        Err(OperatorError::BadName {
            name: name.to_owned(),
        })
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    // Serialising these types cannot fail: they hold only strings, numbers and maps.
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

async fn answer(
    query: &Query,
    conn: &Connection,
    client: &OperatorClient,
    ui: Ui,
) -> Result<String, OperatorError> {
    let now = OffsetDateTime::now_utc();
    match query {
        Query::Fleet => {
            let report = fleet_report(conn, client).await?;
            Ok(if ui.json {
                json(&report)
            } else {
                render::fleet(&report, &ui.style)
            })
        }
        Query::Host(name) => {
            check_name(name)?;
            let detail: HostDetail = client.get_json(&format!("/v1/hosts/{name}")).await?;
            Ok(if ui.json {
                json(&detail)
            } else {
                render::host_detail(&detail, now, &ui.style)
            })
        }
        Query::Rollouts => {
            let list: Vec<RolloutStatus> = client.get_json("/v1/rollouts").await?;
            Ok(if ui.json {
                json(&list)
            } else {
                render::rollouts(&list, now, &ui.style)
            })
        }
        Query::Trace(query) => {
            let list: Vec<RolloutStatus> = client.get_json("/v1/rollouts").await?;
            let id = resolve_rollout(query, &list)?;
            let events: Vec<RolloutEventRecord> =
                client.get_json(&format!("/v1/rollouts/{id}/trace")).await?;
            Ok(if ui.json {
                json(&events)
            } else {
                let rollout = list.iter().find(|r| r.rollout_id == id);
                render::trace(&id, rollout, &events, &ui.style)
            })
        }
        Query::Compliance { channel, framework } => {
            let report =
                compliance::report(client, channel.as_deref(), framework.as_deref()).await?;
            Ok(if ui.json {
                json(&report)
            } else {
                compliance::render(&report, now, &ui.style)
            })
        }
        Query::Evidence(host) => compliance::evidence(client, host).await,
    }
}

/// Everything `nixfleet status` shows, fetched from the control plane.
pub async fn fleet_report(
    conn: &Connection,
    client: &OperatorClient,
) -> Result<StatusReport, OperatorError> {
    let health: Healthz = client.get_json("/healthz").await?;
    let hosts: Vec<HostStatus> = client.get_json("/v1/hosts").await?;
    let all: Vec<RolloutStatus> = client.get_json("/v1/rollouts").await?;
    let mut newest: std::collections::BTreeMap<String, RolloutStatus> = Default::default();
    for r in all {
        match newest.get(&r.channel) {
            Some(kept) if kept.opened_at >= r.opened_at => {}
            _ => {
                newest.insert(r.channel.clone(), r);
            }
        }
    }
    Ok(StatusReport {
        control_plane: conn.url.clone(),
        generated_at: OffsetDateTime::now_utc(),
        version: Some(health.version),
        fleet_signed_at: health.fleet_signed_at,
        last_tick_at: health.last_tick_at,
        rollouts: newest.into_values().collect(),
        hosts,
    })
}

/// A rollout named by its full id, its display name (`stable@1a2b3c4`, the newest one
/// when a release was rolled out twice) or a unique prefix of its id.
pub fn resolve_rollout(query: &str, list: &[RolloutStatus]) -> Result<String, OperatorError> {
    if let Some(r) = list.iter().find(|r| r.rollout_id == query) {
        return Ok(r.rollout_id.clone());
    }
    if let Some(r) = list
        .iter()
        .filter(|r| r.display_name.as_deref() == Some(query))
        .max_by_key(|r| r.opened_at)
    {
        return Ok(r.rollout_id.clone());
    }
    let matches: Vec<&RolloutStatus> = list
        .iter()
        .filter(|r| query.len() >= 4 && r.rollout_id.starts_with(query))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.rollout_id.clone()),
        [] if query.len() == 64 && query.chars().all(|c| c.is_ascii_hexdigit()) => {
            // A full id the list does not hold (pruned): the trail may still exist.
            Ok(query.to_owned())
        }
        [] => Err(OperatorError::NoSuchRollout {
            query: query.to_owned(),
        }),
        many => Err(OperatorError::AmbiguousRollout {
            query: query.to_owned(),
            candidates: many
                .iter()
                .map(|r| render::short_id(&r.rollout_id).to_owned())
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn rollout(id: &str, name: &str, opened: OffsetDateTime) -> RolloutStatus {
        RolloutStatus {
            rollout_id: id.into(),
            channel: "stable".into(),
            display_name: Some(name.into()),
            state: serde_json::json!("converged"),
            opened_at: opened,
            hosts: Default::default(),
            introduced: None,
            latest: None,
        }
    }

    #[test]
    fn rollouts_are_found_by_id_name_or_unique_prefix() {
        let t = datetime!(2026-11-27 10:00:00 UTC);
        let list = vec![
            rollout(&format!("abcd1{}", "0".repeat(59)), "stable@1111111", t),
            rollout(
                &format!("abcd2{}", "0".repeat(59)),
                "stable@2222222",
                t + time::Duration::minutes(1),
            ),
        ];
        assert_eq!(
            resolve_rollout("stable@2222222", &list).unwrap(),
            list[1].rollout_id
        );
        assert_eq!(resolve_rollout("abcd1", &list).unwrap(), list[0].rollout_id);
        assert!(matches!(
            resolve_rollout("abcd", &list),
            Err(OperatorError::AmbiguousRollout { .. })
        ));
        assert!(matches!(
            resolve_rollout("zzzz", &list),
            Err(OperatorError::NoSuchRollout { .. })
        ));
    }

    #[test]
    fn statuses_become_advice() {
        let e = OperatorError::from_status("https://cp/v1/hosts".into(), 403, "nope".into());
        assert!(e.to_string().contains("not a host certificate"), "{e}");
        let e = OperatorError::from_status("https://cp/v1/hosts".into(), 401, "expired".into());
        assert!(e.to_string().contains("nixfleet cert operator"), "{e}");
    }
}
