//! `nixfleet-control-plane`: start-up in the order of SPEC.md §5, then serve until
//! SIGTERM/SIGINT.

mod api;
mod artifacts;
mod audit;
mod clock;
mod config;
mod conns;
mod evidence;
mod fetch;
mod hook;
mod metrics;
mod poll;
mod replica;
mod rollouts;
mod server;
mod state;
mod store;
mod tick;

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use nixfleet_trust::verify::{self, Limits};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::api::App;
use crate::config::Config;
use crate::state::Shared;
use crate::store::Db;

/// Environment variables renamed: (old, new). The old name still works when the new one is
/// not set.
const RENAMED_ENV: [(&str, &str); 1] = [(
    "NIXFLEET_CP_CONFIRM_DEADLINE_SECS",
    "NIXFLEET_CP_CONFIRM_WINDOW_SECS",
)];

// glibc's per-thread arenas keep the tick's freed copies resident; jemalloc returns
// them to the kernel, which holds the resident set of a 100,000-host fleet down.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let mut renamed = Vec::new();
    for (old, new) in RENAMED_ENV {
        if let (Some(value), None) = (std::env::var_os(old), std::env::var_os(new)) {
            // Before any thread exists, so setting the environment is sound.
            std::env::set_var(new, value);
            renamed.push((old, new));
        }
    }
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NIXFLEET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .init();
    for (old, new) in renamed {
        tracing::warn!("{old} is read as {new}; rename it in your environment file");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nixfleet-control-plane: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("refusing to start: {e}");
            eprintln!("nixfleet-control-plane: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_pem(what: &str, path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

async fn run(config: Config) -> Result<(), String> {
    // 1. Database.
    let replica = config.replica_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}:{}", host.trim(), config.listen.port())
    });
    if let Some(url) = &config.database_url {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("--database-url must be a postgres:// URL (leave it unset for the embedded SQLite database at --db-path)".into());
        }
    }
    let password = match &config.database_password_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| {
                    format!(
                        "cannot read --database-password-file {}: {e}",
                        path.display()
                    )
                })?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        None => None,
    };
    let ca_pem = match &config.database_ca_file {
        Some(path) => Some(read_pem("--database-ca-file", path)?),
        None => None,
    };
    let db = store::open(
        config.database_url.as_deref().map(|url| store::PgOptions {
            url,
            password,
            ca_pem,
            replica: &replica,
            pool_size: config.database_pool_size,
        }),
        &config.db_path,
    )
    .await
    .map_err(|e| e.to_string())?;
    if db.shared() {
        tracing::info!(replica = %replica, "database open: PostgreSQL, shared with the other replicas; the leader is elected");
    } else {
        tracing::info!(path = %config.db_path.display(), "database open");
    }

    // A wipe of the database forgets which bootstrap tokens were used; the audit log,
    // which the runbook keeps, remembers them. Restored before anyone can enroll.
    let restored =
        audit::restore_used_tokens(&*db, &config.audit_log, OffsetDateTime::now_utc()).await?;
    tracing::info!(
        audit_log = %config.audit_log.display(),
        restored,
        "used bootstrap tokens restored from the audit log"
    );

    // 2. Trust roots.
    let trust = verify::read_trust_file(&config.trust_file, &Limits::default())
        .map_err(|e| e.to_string())?;
    let now = OffsetDateTime::now_utc();
    let revocations_configured =
        config.revocations_artifact_url.is_some() || config.revocations_artifact.is_some();
    let shared = Arc::new(Shared::new(trust, revocations_configured, now));
    if db.shared() {
        // Until the leadership lock says otherwise.
        shared.set_role(state::Role::Follower);
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let fetcher = fetch::Fetcher::new(Duration::from_secs(config.fetch_timeout_secs))?;
    let poller = Arc::new(poll::Poller::new(
        config.clone(),
        shared.clone(),
        db.clone(),
        metrics.clone(),
        fetcher,
    ));

    poller.load_revocations_floor()?;

    // 3. Prime the verified fleet, or refuse to start.
    poller.prime_fleet().await?;

    // 4. Revocations before any agent request is served. A replica of a shared database
    // applies only a list it verified itself, never one another replica stored.
    if !db.shared() {
        poller.restore_revocations().await?;
    }
    if revocations_configured {
        if let Err(e) = poller.poll_revocations(true).await {
            tracing::warn!("revocations poll failed at start-up: {e}; agent routes answer 503 until a verified list is applied");
        }
    }

    // Only for what `nixfleet status` says about hosts not seen since the start.
    match db.attestations_since(0).await {
        Ok(page) => {
            // Each host's stored compliance evidence, until its first check-in carries it
            // into a new attestation.
            shared.attestations.restore_compliance(
                page.rows
                    .iter()
                    .filter_map(|(host, a)| Some((host.clone(), a.compliance.clone()?))),
            );
            let seen: std::collections::HashMap<String, OffsetDateTime> = page
                .rows
                .into_iter()
                .map(|(host, a)| (host, a.last_seen))
                .collect();
            tracing::info!(hosts = seen.len(), "last check-ins before this start read");
            state::replace(&shared.seen_before, Arc::new(seen));
        }
        Err(e) => tracing::warn!(
            "cannot read the last check-ins before this start ({e}); hosts not seen since read as never seen"
        ),
    }

    // Replicas load it when they take the leadership or follow the leader's writes.
    if !db.shared() {
        let stored = db.load_stored().await.map_err(|e| e.to_string())?;
        tracing::info!(
            rollouts = stored.rollouts.len(),
            "stored rollout state loaded"
        );
        state::replace(&shared.stored, Arc::new(stored));
    }

    // TLS material.
    let fleet_ca = match (&config.fleet_ca_cert, &config.fleet_ca_key) {
        (Some(cert), Some(key)) => match (
            read_pem("fleet CA certificate", cert),
            read_pem("fleet CA key", key),
        ) {
            (Ok(cert_pem), Ok(key_pem)) => Some(
                nixfleet_pki::FleetCa::from_pem(&cert_pem, &key_pem).map_err(|e| e.to_string())?,
            ),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(
                    "{e}; enrollment and renewal answer 503, enrolled agents keep working"
                );
                None
            }
        },
        _ => {
            tracing::info!("no fleet CA key configured; enrollment and renewal answer 503");
            None
        }
    };
    let tls = nixfleet_pki::server_tls_config(
        &read_pem("TLS certificate", &config.tls_cert)?,
        &read_pem("TLS key", &config.tls_key)?,
        &read_pem("client CA", &config.client_ca)?,
    )
    .map_err(|e| e.to_string())?;

    let app = Arc::new(App {
        shared: shared.clone(),
        db: db.clone(),
        metrics: metrics.clone(),
        fleet_ca,
        cert_validity: time::Duration::days(i64::from(config.cert_validity_days)),
        audit_log: Mutex::new(None),
        audit_log_path: config.audit_log.clone(),
        checkin_interval_secs: config.checkin_interval_secs,
        replica: replica.clone(),
        reports_per_minute: config.reports_per_minute,
        report_windows: Mutex::new(Default::default()),
        evidence_windows: Mutex::new(Default::default()),
        evidence_locks: Mutex::new(Default::default()),
        reports_per_host: usize::try_from(config.reports_per_host).unwrap_or(usize::MAX),
        revoked_seen: Mutex::new(Default::default()),
    });

    // 5. Listen, tick at once, then on the interval.
    let listener =
        listen(config.listen).map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    tracing::info!(listen = %config.listen, "listening");
    let (stop, stopped) = watch::channel(false);
    let drain = Duration::from_secs(config.drain_timeout_secs);
    let mut tasks = tokio::task::JoinSet::new();
    let (limits, files) = conns::Limits::resolve(
        config.max_connections,
        config.max_connections_per_source,
        server::HEADER_READ_TIMEOUT,
    );
    tracing::info!(
        max_connections = limits.max_connections,
        max_connections_per_source = limits.max_per_source,
        open_file_limit = files,
        "connection limits (0 per source: no limit); idle connections are closed after 10 s"
    );
    tasks.spawn(server::serve_tls(
        listener,
        Arc::new(tls),
        api::router(app.clone()),
        conns::Registry::new(limits, metrics.clone()),
        stopped.clone(),
        drain,
    ));
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} for metrics: {e}"))?;
        tasks.spawn(server::serve_plain(
            listener,
            api::metrics_router(app.clone()),
            stopped.clone(),
        ));
    }
    let tick_config = tick::TickConfig {
        confirm_window_secs: config.confirm_window_secs,
        activation_timeout_secs: config.activation_timeout_secs,
        offline_after_secs: u64::from(config.checkin_interval_secs) * 3,
        late_confirm_grace_secs: if db.shared() {
            replica::LATE_CONFIRM_GRACE.as_secs()
        } else {
            0
        },
    };
    let event_hook = config.event_hook.clone().map(|command| {
        tracing::info!(command = %command, "event hook configured");
        let (hook, task) = hook::EventHook::start(
            command,
            Duration::from_secs(config.event_hook_timeout_secs.max(1)),
            metrics.clone(),
            stopped.clone(),
        );
        tasks.spawn(async move {
            let _ = task.await;
        });
        hook
    });
    tasks.spawn(tick_loop(
        shared.clone(),
        db.clone(),
        metrics.clone(),
        tick_config,
        event_hook,
        Duration::from_secs(config.tick_interval_secs.max(1)),
        stopped.clone(),
    ));
    if db.shared() {
        tasks.spawn(replica::lead_loop(
            shared.clone(),
            db.clone(),
            Duration::from_secs(config.tick_interval_secs.max(1)),
            stopped.clone(),
        ));
        tasks.spawn(replica::sync_loop(
            shared.clone(),
            db.clone(),
            tick_config.confirm_window_secs,
            stopped.clone(),
        ));
    }
    tasks.spawn(poller.clone().run_fleet_polls(stopped.clone()));
    if revocations_configured {
        tasks.spawn(poller.clone().run_revocation_polls(stopped.clone()));
    }
    tasks.spawn(poller.clone().watch_trust_file(stopped.clone()));

    shutdown_signal().await;
    tracing::info!("shutting down: draining requests");
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    if !db.shared() {
        // Every host's last check-in, so that the next start knows whom it saw and when.
        let all: Vec<_> = shared
            .attestations
            .snapshot()
            .into_iter()
            .map(|(h, a)| (h, std::sync::Arc::unwrap_or_clone(a)))
            .collect();
        let hosts = all.len();
        match db.save_attestations(all).await {
            Ok(()) => tracing::info!(hosts, "last check-ins written"),
            Err(e) => tracing::warn!("cannot write the last check-ins: {e}"),
        }
    }
    if let Err(e) = db.close().await {
        tracing::warn!("closing the database: {e}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Connections the kernel queues while the accept loop is busy (capped by
/// net.core.somaxconn). Agents reconnecting in a burst, e.g. after a restart, would
/// otherwise have SYNs dropped and retry only after a second.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As TcpListener::bind does: a restarted control plane can bind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn tick_loop(
    shared: Arc<Shared>,
    db: Arc<Db>,
    metrics: Arc<metrics::Metrics>,
    config: tick::TickConfig,
    event_hook: Option<hook::EventHook>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let started = std::time::Instant::now();
        // Followers do not decide: the leader's published state is what they serve.
        let outcome = if shared.decides() {
            Some(tick::run_tick(&shared, db.as_ref(), config, event_hook.as_ref()).await)
        } else {
            None
        };
        match outcome {
            Some(Ok(Some(in_flight))) => {
                let seconds = started.elapsed().as_secs_f64();
                metrics.observe_tick(seconds, in_flight);
                tracing::debug!(seconds, in_flight, "reconcile tick done");
            }
            Some(Ok(None)) | None => {}
            Some(Err(tick::TickError::Db(e))) if db.shared() => {
                // The session that holds the leadership is given up with the failed write;
                // taking it again starts from what the database holds.
                shared.set_role(state::Role::Follower);
                tracing::warn!("reconcile tick not written: {e}; stepping down, the leadership is taken again from the stored state");
            }
            Some(Err(e)) => tracing::error!("reconcile tick failed: {e}"),
        }
        if !db.shared() {
            let changed = shared.attestations.take_unsaved();
            if !changed.is_empty() {
                if let Err(e) = db.save_attestations(changed).await {
                    tracing::warn!("cannot write changed check-ins: {e}");
                }
            }
        }
        // Confirm deadlines are watched closely while anything is mid-activation.
        let wait = if tick::anything_in_flight(&shared.stored()) {
            interval.min(tick::DEADLINE_CHECK)
        } else {
            interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.tick_now.notified() => {
                // Coalesce bursts of confirms into one tick.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ = stop.changed() => return,
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
