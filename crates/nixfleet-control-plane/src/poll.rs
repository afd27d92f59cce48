//! Priming and polling the signed artifacts. A failure keeps the last verified state and
//! logs the URL and the reason; an older snapshot never replaces a newer one.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nixfleet_trust::verify::Limits;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::artifacts::{self, FileSource, FleetSnapshot, SourceError, UrlSource};
use crate::audit;
use crate::clock::{rfc3339, unix};
use crate::config::Config;
use crate::fetch::{Fetcher, Validators};
use crate::metrics::Metrics;
use crate::state::{replace, RevocationSet, Role, Shared};
use crate::store::{Db, SignedArtifact, FLEET_ARTIFACT, MANIFEST_PREFIX, REVOCATIONS_ARTIFACT};
use nixfleet_reconciler::RolloutState;

/// Where a follower's artifacts come from, for logs.
const DATABASE_ORIGIN: &str = "the database (as the leader published it)";

pub struct Poller {
    config: Config,
    shared: Arc<Shared>,
    db: Arc<Db>,
    metrics: Arc<Metrics>,
    fetcher: Fetcher,
    fleet_validators: Mutex<Option<Validators>>,
    revocation_validators: Mutex<Option<Validators>>,
    /// The revocation list last applied, as signed, for a leader to publish.
    applied_revocations: Mutex<Option<SignedArtifact>>,
    /// The version of the published artifacts a follower last took.
    followed_version: Mutex<Option<i64>>,
    /// The newest revocation list ever applied here, kept across wipes next to the audit
    /// log: nothing older is accepted.
    revocations_floor: Mutex<Option<OffsetDateTime>>,
}

fn url_source(
    artifact: &Option<String>,
    signature: &Option<String>,
    token: &Option<std::path::PathBuf>,
) -> Option<UrlSource> {
    let artifact_url = artifact.clone()?;
    let signature_url = signature
        .clone()
        .unwrap_or_else(|| format!("{artifact_url}.sig"));
    Some(UrlSource {
        artifact_url,
        signature_url,
        token_file: token.clone(),
    })
}

fn file_source(
    artifact: &Option<std::path::PathBuf>,
    signature: &Option<std::path::PathBuf>,
) -> Option<FileSource> {
    let artifact = artifact.clone()?;
    let signature = signature.clone().unwrap_or_else(|| {
        let mut s = artifact.clone().into_os_string();
        s.push(".sig");
        s.into()
    });
    Some(FileSource {
        artifact,
        signature,
    })
}

/// How often a follower looks for newly published artifacts.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Poller {
    pub fn new(
        config: Config,
        shared: Arc<Shared>,
        db: Arc<Db>,
        metrics: Arc<Metrics>,
        fetcher: Fetcher,
    ) -> Poller {
        Poller {
            config,
            shared,
            db,
            metrics,
            fetcher,
            fleet_validators: Mutex::new(None),
            revocation_validators: Mutex::new(None),
            applied_revocations: Mutex::new(None),
            followed_version: Mutex::new(None),
            revocations_floor: Mutex::new(None),
        }
    }

    /// Reads the revocations high-water mark kept next to the audit log (start-up).
    pub fn load_revocations_floor(&self) -> Result<(), String> {
        let path = audit::revocations_floor_path(&self.config.audit_log);
        let floor = audit::read_revocations_floor(&path)?;
        if let Some(at) = floor {
            tracing::info!(
                "revocation lists signed before {} are refused ({})",
                rfc3339(at),
                path.display()
            );
        }
        *lock(&self.revocations_floor) = floor;
        Ok(())
    }

    fn fleet_url(&self) -> Option<UrlSource> {
        url_source(
            &self.config.channel_refs_artifact_url,
            &self.config.channel_refs_signature_url,
            &self.config.channel_refs_token_file,
        )
    }

    fn revocations_url(&self) -> Option<UrlSource> {
        url_source(
            &self.config.revocations_artifact_url,
            &self.config.revocations_signature_url,
            &self.config.revocations_token_file,
        )
    }

    /// Start-up step 3: the channel-refs URL first, the build-time artifact second.
    pub async fn prime_fleet(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if let Some(source) = self.fleet_url() {
            match self.fetch_fleet(&source, None).await {
                Ok(Some((fleet, validators))) => {
                    *lock(&self.fleet_validators) = Some(validators);
                    tracing::info!(
                        "primed verified fleet from channel-refs {} (signed {})",
                        source.artifact_url,
                        rfc3339(fleet.signed_at())
                    );
                    self.install(fleet);
                    return Ok(());
                }
                Ok(None) => errors.push(format!(
                    "channel-refs {}: not modified",
                    source.artifact_url
                )),
                Err(e) => {
                    tracing::warn!("channel-refs fetch failed at start-up: {e}");
                    errors.push(format!("channel-refs: {e}"));
                }
            }
        } else {
            errors.push("channel-refs: no --channel-refs-artifact-url configured".into());
        }
        if self.db.shared() {
            match self.database_fleet().await {
                Ok(fleet) => {
                    tracing::info!(
                        "primed verified fleet from {DATABASE_ORIGIN} (signed {})",
                        rfc3339(fleet.signed_at())
                    );
                    self.install(fleet);
                    return Ok(());
                }
                Err(e) => errors.push(format!("database: {e}")),
            }
        }
        match file_source(&self.config.artifact, &self.config.signature) {
            Some(source) => match self.read_fleet(&source).await {
                Ok(fleet) => {
                    tracing::info!(
                        "primed verified fleet from build-time artifact {} (signed {})",
                        source.artifact.display(),
                        rfc3339(fleet.signed_at())
                    );
                    self.install(fleet);
                    return Ok(());
                }
                Err(e) => errors.push(format!("build-time artifact: {e}")),
            },
            None => errors.push("build-time artifact: no --artifact configured".into()),
        }
        Err(format!(
            "no verified fleet.resolved; fix one of these and restart:\n  - {}",
            errors.join("\n  - ")
        ))
    }

    async fn fetch_fleet(
        &self,
        source: &UrlSource,
        validators: Option<&Validators>,
    ) -> Result<Option<(FleetSnapshot, Validators)>, SourceError> {
        let limit = Limits::default().fleet_bytes;
        let Some((bytes, signature, validators)) =
            artifacts::fetch_pair(&self.fetcher, source, validators, limit).await?
        else {
            return Ok(None);
        };
        let trust = self.shared.trust();
        let now = OffsetDateTime::now_utc();
        let fleet = artifacts::verify_fleet(&source.artifact_url, &bytes, &signature, &trust, now)?;
        Ok(Some((
            self.snapshot(fleet, signature, source.artifact_url.clone())
                .await,
            validators,
        )))
    }

    async fn read_fleet(&self, source: &FileSource) -> Result<FleetSnapshot, SourceError> {
        let (bytes, signature) = artifacts::read_pair(source, Limits::default().fleet_bytes)?;
        let trust = self.shared.trust();
        let origin = source.artifact.display().to_string();
        let fleet = artifacts::verify_fleet(
            &origin,
            &bytes,
            &signature,
            &trust,
            OffsetDateTime::now_utc(),
        )?;
        Ok(self.snapshot(fleet, signature, origin).await)
    }

    /// The manifests of `fleet`: from the rollouts directory and/or the URL template.
    async fn manifests_for(
        &self,
        fleet: &nixfleet_trust::verify::Verified<nixfleet_proto::FleetResolved>,
    ) -> artifacts::Manifests {
        let trust = self.shared.trust();
        let now = OffsetDateTime::now_utc();
        let mut manifests = match &self.config.rollouts_dir {
            Some(dir) => artifacts::load_manifests(dir, fleet, &trust, now),
            None => Default::default(),
        };
        if let Some(template) = &self.config.rollouts_url_template {
            for channel in fleet.value.channels.keys() {
                if manifests
                    .verified
                    .values()
                    .any(|m| &m.value.channel == channel)
                {
                    continue;
                }
                let url = template.replace("{channel}", channel);
                let source = UrlSource {
                    signature_url: format!("{url}.sig"),
                    artifact_url: url,
                    token_file: self.config.channel_refs_token_file.clone(),
                };
                match artifacts::fetch_manifest(&self.fetcher, &source, fleet, &trust, now).await {
                    Ok(loaded) => manifests.insert(loaded),
                    Err(e) => {
                        tracing::warn!("rollout manifest of channel {channel} not loaded: {e}")
                    }
                }
            }
        }
        manifests
    }

    async fn snapshot(
        &self,
        fleet: nixfleet_trust::verify::Verified<nixfleet_proto::FleetResolved>,
        fleet_signature: Vec<u8>,
        origin: String,
    ) -> FleetSnapshot {
        let manifests = self.manifests_for(&fleet).await;
        for channel in fleet.value.channels.keys() {
            if !manifests
                .verified
                .values()
                .any(|m| &m.value.channel == channel)
            {
                tracing::warn!(channel = %channel, "no verified rollout manifest for this channel of the fleet yet");
            }
        }
        FleetSnapshot::new(fleet, fleet_signature, origin, manifests)
    }

    /// Installs a snapshot unless it is older than the one in use.
    fn install(&self, mut snapshot: FleetSnapshot) {
        if let Some(current) = self.shared.fleet() {
            // A rollout still on record keeps its signed plan when a release that no longer
            // carries its intent arrives: it runs to its end (the newer one waits behind it,
            // queue depth 1) rather than being stranded without a manifest.
            let stored = self.shared.stored();
            for (id, record) in &stored.rollouts {
                if matches!(record.state, RolloutState::Superseded { .. })
                    || snapshot.manifests.contains_key(id)
                {
                    continue;
                }
                if let (Some(m), Some(sig)) =
                    (current.manifests.get(id), current.signatures.get(id))
                {
                    tracing::info!(rollout = %id, channel = %record.channel, "the new release does not carry this rollout's intent; keeping its verified manifest until the rollout ends");
                    let tree = current.trees.get(id).cloned();
                    snapshot.keep_manifest(id, m.clone(), sig.clone(), tree);
                }
            }
            if snapshot.signed_at() < current.signed_at() {
                tracing::warn!(
                    "{} served a fleet signed {} but the verified fleet in use is newer ({}); keeping the newer one",
                    snapshot.origin,
                    rfc3339(snapshot.signed_at()),
                    rfc3339(current.signed_at())
                );
                return;
            }
            if snapshot.fleet.sha256 == current.fleet.sha256
                && snapshot.manifests.len() <= current.manifests.len()
            {
                return;
            }
        }
        tracing::info!(
            origin = %snapshot.origin,
            sha256 = %snapshot.fleet.sha256,
            manifests = snapshot.manifests.len(),
            "verified fleet installed"
        );
        replace(&self.shared.fleet, Some(Arc::new(snapshot)));
        self.shared.tick_now.notify_one();
    }

    pub async fn poll_fleet(&self) {
        let Some(source) = self.fleet_url() else {
            self.rescan_manifests().await;
            return;
        };
        let validators = lock(&self.fleet_validators).clone();
        // Manifests may be published after the fleet: do a full fetch until all are here.
        let complete = self.shared.fleet().is_some_and(|f| {
            f.fleet
                .value
                .channels
                .keys()
                .all(|c| f.manifests.values().any(|m| &m.value.channel == c))
        });
        let validators = if complete { validators } else { None };
        match self.fetch_fleet(&source, validators.as_ref()).await {
            Ok(Some((snapshot, validators))) => {
                *lock(&self.fleet_validators) = Some(validators);
                tracing::info!(
                    "channel-refs poll: {} verified (signed {})",
                    source.artifact_url,
                    rfc3339(snapshot.signed_at())
                );
                self.install(snapshot);
                self.success(true);
            }
            Ok(None) => {
                tracing::debug!("channel-refs poll: {} not modified", source.artifact_url);
                self.success(true);
                if !complete {
                    self.rescan_manifests().await;
                }
            }
            Err(e) => {
                Metrics::inc(&self.metrics.channel_refs_failed);
                let keeping = self
                    .shared
                    .fleet()
                    .map(|f| {
                        format!(
                            "keeping the verified fleet signed {}",
                            rfc3339(f.signed_at())
                        )
                    })
                    .unwrap_or_else(|| "no verified fleet yet".into());
                tracing::warn!("channel-refs poll failed: {e}; {keeping}");
            }
        }
    }

    async fn rescan_manifests(&self) {
        let Some(current) = self.shared.fleet() else {
            return;
        };
        let manifests = self.manifests_for(&current.fleet).await;
        // Only new ids matter (the one in use may also hold manifests kept from before).
        if manifests
            .verified
            .keys()
            .any(|id| !current.manifests.contains_key(id))
        {
            self.install(FleetSnapshot::new(
                current.fleet.clone(),
                current.fleet_signature.clone(),
                current.origin.clone(),
                manifests,
            ));
        }
    }

    fn success(&self, fleet: bool) {
        let now = unix(OffsetDateTime::now_utc());
        if fleet {
            Metrics::inc(&self.metrics.channel_refs_ok);
            self.metrics
                .channel_refs_last_success
                .store(now, Ordering::Relaxed);
        } else {
            Metrics::inc(&self.metrics.revocations_ok);
            self.metrics
                .revocations_last_success
                .store(now, Ordering::Relaxed);
        }
    }

    /// The leader (or a single control plane) polls the forge; a follower takes what the
    /// leader verified from the database and verifies it again.
    pub async fn run_fleet_polls(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let interval = Duration::from_secs(self.config.channel_refs_poll_secs.max(1));
        loop {
            let wait = if self.shared.role() == Role::Follower {
                FOLLOW_INTERVAL.min(interval)
            } else {
                interval
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.poll_now.notified() => {}
                _ = stop.changed() => return,
            }
            match self.shared.role() {
                Role::Single => self.poll_fleet().await,
                Role::Leader => {
                    self.poll_fleet().await;
                    self.publish().await;
                }
                Role::Follower => self.follow_database().await,
            }
        }
    }

    /// Stores the artifacts this leader verified, for the followers. Idempotent: only
    /// what changed is written, and never over something signed later.
    async fn publish(&self) {
        let mut set = Vec::new();
        if let Some(f) = self.shared.fleet() {
            set.push(SignedArtifact {
                name: FLEET_ARTIFACT.to_owned(),
                body: f.fleet.canonical.clone(),
                signature: f.fleet_signature.clone(),
                sha256: f.fleet.sha256.clone(),
                signed_at: f.fleet.signed_at,
            });
            for (id, m) in &f.manifests {
                if let Some(signature) = f.signatures.get(id) {
                    set.push(SignedArtifact {
                        name: format!("{MANIFEST_PREFIX}{id}"),
                        body: m.canonical.clone(),
                        signature: signature.clone(),
                        sha256: m.sha256.clone(),
                        signed_at: m.signed_at,
                    });
                    set.extend(artifacts::lists_artifact(m));
                }
            }
        }
        set.extend(lock(&self.applied_revocations).clone());
        if set.is_empty() {
            return;
        }
        match self.db.publish_artifacts(set).await {
            Ok(true) => tracing::info!("published the verified artifacts to the database for the followers"),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "cannot publish the verified artifacts to the database: {e}; followers keep what they verified last"
            ),
        }
    }

    /// The fleet and its manifests as the leader published them, verified here.
    async fn database_fleet(&self) -> Result<FleetSnapshot, String> {
        let (_, stored) = self
            .db
            .signed_artifacts()
            .await
            .map_err(|e| e.to_string())?;
        self.stored_fleet(&stored)
    }

    fn stored_fleet(&self, stored: &[SignedArtifact]) -> Result<FleetSnapshot, String> {
        let fleet = stored
            .iter()
            .find(|a| a.name == FLEET_ARTIFACT)
            .ok_or_else(|| "no fleet published yet".to_owned())?;
        let trust = self.shared.trust();
        let now = OffsetDateTime::now_utc();
        // The fleet in use, when the stored one claims to be it: its manifests are checked
        // against what was verified already, rather than verifying the whole fleet again
        // whenever a revocation list or a manifest is published. A false claim only keeps
        // the fleet in use.
        let (verified, signature) = match self.shared.fleet() {
            Some(current) if current.fleet.sha256 == fleet.sha256 => {
                (current.fleet.clone(), current.fleet_signature.clone())
            }
            _ => (
                artifacts::verify_fleet(
                    DATABASE_ORIGIN,
                    &fleet.body,
                    &fleet.signature,
                    &trust,
                    now,
                )
                .map_err(|e| e.to_string())?,
                fleet.signature.clone(),
            ),
        };
        let manifests = artifacts::stored_manifests(stored, &verified, &trust, now);
        Ok(FleetSnapshot::new(
            verified,
            signature,
            DATABASE_ORIGIN.to_owned(),
            manifests,
        ))
    }

    /// A follower's poll: when the published artifacts changed, verify and take them. A
    /// refused artifact leaves the verified state in use as it is.
    async fn follow_database(&self) {
        let version = match self.db.artifacts_version().await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!("cannot read the published artifacts' version: {e}");
                return;
            }
        };
        if *lock(&self.followed_version) == Some(version) {
            return;
        }
        let (version, stored) = match self.db.signed_artifacts().await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(
                    "cannot read the published artifacts: {e}; keeping the verified state in use"
                );
                return;
            }
        };
        *lock(&self.followed_version) = Some(version);
        let stored_fleet = stored.iter().find(|a| a.name == FLEET_ARTIFACT);
        let manifests = stored
            .iter()
            .filter(|a| a.name.starts_with(MANIFEST_PREFIX))
            .count();
        // What `install` would keep out anyway: the fleet in use with no more manifests.
        let nothing_new = stored_fleet.is_some_and(|f| {
            self.shared.fleet().is_some_and(|current| {
                current.fleet.sha256 == f.sha256 && manifests <= current.manifests.len()
            })
        });
        if stored_fleet.is_none() {
            tracing::debug!(
                "no fleet published in the database yet; keeping the verified fleet in use"
            );
        } else if nothing_new {
            self.success(true);
        } else {
            match self.stored_fleet(&stored) {
                Ok(snapshot) => {
                    self.install(snapshot);
                    self.success(true);
                }
                Err(e) => {
                    Metrics::inc(&self.metrics.channel_refs_failed);
                    tracing::error!("the fleet published in the database is refused: {e}; keeping the verified fleet in use");
                }
            }
        }
        let applied = self.shared.revocations();
        let newer_applied = |list: &SignedArtifact| {
            applied.signed_at.is_some_and(|at| at > list.signed_at)
                || applied.sha256.as_deref() == Some(list.sha256.as_str())
        };
        // A list this replica applied itself may be newer than the leader's last one.
        if let Some(list) = stored
            .iter()
            .find(|a| a.name == REVOCATIONS_ARTIFACT && !newer_applied(a))
        {
            let verified = artifacts::verify_revocations(
                DATABASE_ORIGIN,
                &list.body,
                &list.signature,
                &self.shared.trust(),
                OffsetDateTime::now_utc(),
                self.shared.revocations().signed_at,
            );
            match verified {
                Ok(verified) => {
                    match self
                        .apply_revocations(verified, list.signature.clone(), DATABASE_ORIGIN)
                        .await
                    {
                        Ok(()) => self.success(false),
                        Err(e) => tracing::warn!("revocations from the database not applied: {e}"),
                    }
                }
                Err(e) => {
                    Metrics::inc(&self.metrics.revocations_failed);
                    tracing::error!("the revocation list published in the database is refused: {e}; keeping the applied list");
                }
            }
        }
    }

    /// A list applied before (the database survived a restart) is still authoritative.
    pub async fn restore_revocations(&self) -> Result<(), String> {
        let (list, signed_at) = self.db.revocations().await.map_err(|e| e.to_string())?;
        if let Some(signed_at) = signed_at {
            tracing::info!(
                "revocations restored from the database: list signed {}, {} cert_revocations rows",
                rfc3339(signed_at),
                list.len()
            );
            replace(
                &self.shared.revocations,
                Arc::new(RevocationSet {
                    entries: list.into_iter().map(|r| (r.hostname.clone(), r)).collect(),
                    signed_at: Some(signed_at),
                    // Unknown here: the next poll re-applies the same list, harmlessly.
                    sha256: None,
                    applied_at: Some(OffsetDateTime::now_utc()),
                }),
            );
            self.shared.revocations_ready.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Fetches, verifies and applies the revocation list; at start-up the build-time
    /// files are the fallback.
    pub async fn poll_revocations(&self, startup: bool) -> Result<(), String> {
        let trust = self.shared.trust();
        let last_applied = self
            .shared
            .revocations()
            .signed_at
            .max(*lock(&self.revocations_floor));
        let limit = Limits::default().revocations_bytes;
        let mut errors = Vec::new();
        if let Some(source) = self.revocations_url() {
            let validators = lock(&self.revocation_validators).clone();
            let validators = if self.shared.revocations_ready() {
                validators
            } else {
                None
            };
            match artifacts::fetch_pair(&self.fetcher, &source, validators.as_ref(), limit).await {
                Ok(None) => {
                    tracing::debug!("revocations poll: {} not modified", source.artifact_url);
                    self.success(false);
                    return Ok(());
                }
                Ok(Some((bytes, signature, validators))) => {
                    match artifacts::verify_revocations(
                        &source.artifact_url,
                        &bytes,
                        &signature,
                        &trust,
                        OffsetDateTime::now_utc(),
                        last_applied,
                    ) {
                        Ok(list) => {
                            self.apply_revocations(list, signature, &source.artifact_url)
                                .await?;
                            *lock(&self.revocation_validators) = Some(validators);
                            self.success(false);
                            return Ok(());
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if startup || self.revocations_url().is_none() {
            if let Some(source) = file_source(
                &self.config.revocations_artifact,
                &self.config.revocations_signature,
            ) {
                let origin = source.artifact.display().to_string();
                match artifacts::read_pair(&source, limit).and_then(|(bytes, signature)| {
                    artifacts::verify_revocations(
                        &origin,
                        &bytes,
                        &signature,
                        &trust,
                        OffsetDateTime::now_utc(),
                        last_applied,
                    )
                    .map(|list| (list, signature))
                }) {
                    Ok((list, signature)) => {
                        self.apply_revocations(list, signature, &origin).await?;
                        self.success(false);
                        return Ok(());
                    }
                    Err(e) => errors.push(format!("build-time revocations: {e}")),
                }
            }
        }
        Metrics::inc(&self.metrics.revocations_failed);
        let text = errors.join("; ");
        tracing::warn!("revocations poll failed: {text}; keeping the applied list");
        Err(text)
    }

    async fn apply_revocations(
        &self,
        list: nixfleet_trust::verify::Verified<nixfleet_proto::Revocations>,
        signature: Vec<u8>,
        origin: &str,
    ) -> Result<(), String> {
        *lock(&self.applied_revocations) = Some(SignedArtifact {
            name: REVOCATIONS_ARTIFACT.to_owned(),
            body: list.canonical.clone(),
            signature,
            sha256: list.sha256.clone(),
            signed_at: list.signed_at,
        });
        let current = self.shared.revocations();
        if current.sha256.as_deref() == Some(list.sha256.as_str())
            && self.shared.revocations_ready()
        {
            tracing::debug!("revocations poll: {origin} unchanged");
            return Ok(());
        }
        let now = OffsetDateTime::now_utc();
        let rows = self
            .db
            .replace_revocations(
                list.value.revocations.clone(),
                list.signed_at,
                list.sha256.clone(),
                now,
            )
            .await
            .map_err(|e| e.to_string())?;
        replace(
            &self.shared.revocations,
            Arc::new(RevocationSet {
                entries: list
                    .value
                    .revocations
                    .iter()
                    .map(|r| (r.hostname.clone(), r.clone()))
                    .collect(),
                signed_at: Some(list.signed_at),
                sha256: Some(list.sha256.clone()),
                applied_at: Some(now),
            }),
        );
        self.shared.revocations_ready.store(true, Ordering::Release);
        tracing::info!(
            "revocations poll: applied list from {origin} signed {}; cert_revocations now has {rows} rows",
            rfc3339(list.signed_at)
        );
        let newer = lock(&self.revocations_floor).is_none_or(|floor| list.signed_at > floor);
        if newer {
            let path = audit::revocations_floor_path(&self.config.audit_log);
            match audit::write_revocations_floor(&path, list.signed_at, &list.sha256) {
                Ok(()) => *lock(&self.revocations_floor) = Some(list.signed_at),
                Err(e) => tracing::error!(
                    "cannot record the applied revocation list in {}: {e}; after a wipe of the database an older list could be accepted",
                    path.display()
                ),
            }
        }
        Ok(())
    }

    pub async fn run_revocation_polls(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        // Until a list is applied, retry quickly: agent routes answer 503 meanwhile.
        let interval = Duration::from_secs(self.config.revocations_poll_secs.max(1));
        loop {
            let wait = if self.shared.revocations_ready() {
                interval
            } else {
                interval.min(Duration::from_secs(2))
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            match self.shared.role() {
                // Its list comes with the published artifacts; the forge only until then.
                Role::Follower if self.shared.revocations_ready() => {}
                Role::Follower | Role::Single => {
                    let _ = self.poll_revocations(false).await;
                }
                Role::Leader => {
                    let _ = self.poll_revocations(false).await;
                    self.publish().await;
                }
            }
        }
    }

    /// Re-reads trust.json when it changes: a key rotation needs no restart.
    pub async fn watch_trust_file(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let path = self.config.trust_file.clone();
        let stamp = |p: &std::path::Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
        };
        let mut last = stamp(&path);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = stop.changed() => return,
            }
            let now = stamp(&path);
            if now == last {
                continue;
            }
            last = now;
            match nixfleet_trust::verify::read_trust_file(&path, &Limits::default()) {
                Ok(trust) => {
                    tracing::info!(path = %path.display(), "trust file changed; new trust roots in use");
                    replace(&self.shared.trust, Arc::new(trust));
                }
                Err(e) => tracing::error!(
                    "trust file changed but is refused: {e}; keeping the previous trust roots"
                ),
            }
        }
    }
}
