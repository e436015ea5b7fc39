//! Turns settings into a running service: store, migrations, master key, root
//! keys, key ring, background tasks, router, listener; and shuts it down.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Settings;
use crate::domain::service::KeyService;
use crate::domain::service::RootKeyError;
use crate::domain::sync::follow_changes;
use crate::http::{self, AppParts, AppState, RouterSettings};
use crate::master_key;
use crate::server;
use crate::store::{Store, StoreError};
use crate::tls::ReloadableTls;

/// A built, bound, not yet serving Keyward.
pub struct Application {
    listener: TcpListener,
    /// The address `listener` is bound to.
    local_addr: SocketAddr,
    service: Arc<KeyService>,
    router: http::Edge,
    tls: Option<Arc<ReloadableTls>>,
    /// The plain-HTTP listener for probes and monitoring, if configured.
    ops: Option<(TcpListener, http::Edge)>,
    /// The use-count bound, for the final flush at shutdown.
    rotate_after_encryptions: u64,
    shutdown_timeout: Duration,
    /// The bounds on the API listener's connections.
    connection_limits: server::ConnectionLimits,
    /// The bounds on the ops listener's connections: its own, smaller budget.
    ops_connection_limits: server::ConnectionLimits,
    background: watch::Sender<bool>,
    audit: crate::audit::AuditLog,
}

/// How long to keep retrying an unreachable database at start.
const DATABASE_WAIT: Duration = Duration::from_secs(30);

/// Connects to the database, retrying while it is unreachable, and migrates it.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    let store = loop {
        match Store::connect(
            settings.database_url.expose(),
            settings.database_max_connections,
        )
        .await
        {
            Ok(store) => break store,
            Err(StoreError::Unavailable(e)) if started.elapsed() < DATABASE_WAIT => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database unreachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("cannot open the database (KEYWARD_DATABASE_URL)"),
        }
    };
    store
        .migrate()
        .await
        .context("cannot apply the database migrations")?;
    Ok(store)
}

/// The operator's job sources, checked (Keyward's own database refused).
fn job_sources(settings: &Settings) -> anyhow::Result<crate::domain::sources::JobSources> {
    let specs = settings
        .job_sources
        .iter()
        .map(|s| crate::domain::sources::SourceSpec {
            name: s.name.clone(),
            url: zeroize::Zeroizing::new(s.url.expose().to_string()),
            tenants: s.tenants.clone(),
            tables: s.tables.clone(),
        })
        .collect();
    crate::domain::sources::JobSources::new(
        specs,
        settings.database_url.expose(),
        crate::store::source::SourceLimits {
            connect_timeout: settings.job_source_connect_timeout,
            statement_timeout: settings.job_source_statement_timeout,
        },
    )
    .map_err(|e| anyhow::anyhow!("KEYWARD_JOB_SOURCES_FILE: {e}"))
}

impl Application {
    /// Builds everything and binds the listener (port 0 picks a free port).
    pub async fn build(settings: &Settings) -> anyhow::Result<Application> {
        http::metrics::install_metrics_recorder();
        let managed = settings
            .acme
            .as_ref()
            .map(|_| Arc::new(crate::tls::ManagedCert::default()));
        let tls = match &settings.tls {
            Some(files) => Some(Arc::new(ReloadableTls::load(files.clone(), managed.clone())?)),
            None if settings.listen.ip().is_loopback() => None,
            None if settings.allow_plaintext => {
                tracing::warn!(
                    listen = %settings.listen,
                    "serving plain HTTP on a non-loopback address (KEYWARD_ALLOW_PLAINTEXT=true): \
                     API secrets and plaintext cross the network unencrypted unless a proxy terminates TLS"
                );
                None
            }
            None => anyhow::bail!(
                "refusing to serve plain HTTP on {} (not loopback): set KEYWARD_TLS_CERT and KEYWARD_TLS_KEY, \
                 or KEYWARD_ALLOW_PLAINTEXT=true behind a TLS-terminating proxy",
                settings.listen
            ),
        };
        let provider = settings.provider_settings(settings.master_key_provider, false)?;
        let provider = master_key::build(provider).await?;
        let store = open_store(settings).await?;
        let audit = crate::audit::AuditLog::start(
            &settings.audit,
            Some(store.clone()),
            settings.audit_checkpoints,
        )?;
        audit.rotate_file_at(settings.audit_file_max_bytes);
        let job_sources = job_sources(settings)?;
        tracing::info!(job_sources = job_sources.len(), "job sources registered");
        let service = Arc::new(
            KeyService::new(store, provider, settings.key_ring_capacity)
                .with_freshness(settings.freshness)
                .with_recorder(Arc::new(AuditRecorder(audit.clone())))
                .with_job_sources(job_sources)
                .with_limits(crate::domain::service::ServiceLimits {
                    client_key_max_failures: settings.client_key_max_failures,
                    client_key_lockout: settings.client_key_lockout,
                    max_encryptions_per_version: settings.max_encryptions_per_version,
                    max_api_keys_per_tenant: settings.max_api_keys_per_tenant,
                }),
        );
        // Checkpoints are signed with the active root KEK's key from when the
        // root keys are loaded (a weak reference: the service holds the log).
        let signing = Arc::downgrade(&service);
        audit.sign_checkpoints_with(Box::new(move || {
            signing
                .upgrade()
                .and_then(|service| service.checkpoint_key())
        }));
        let (background, shutdown_rx) = watch::channel(false);
        {
            let service = service.clone();
            let mut stop = shutdown_rx.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = service.provider().keep_alive() => {}
                    _ = stop.changed() => {}
                }
            });
        }
        match service.load_root_keys().await {
            Ok(()) => {
                tokio::spawn(keep_finishing_kek_rotations(
                    service.clone(),
                    shutdown_rx.clone(),
                ));
            }
            Err(RootKeyError::Provider(e)) => {
                // Serve (not ready, with the reason) and keep trying, rather than
                // exit into a crash loop that says nothing.
                tracing::warn!(error = %e, provider = service.provider().name(), "master-key provider unreachable at start; retrying");
                tokio::spawn(retry_root_keys(service.clone(), shutdown_rx.clone()));
            }
            Err(e) => return Err(e).context("cannot load the root key"),
        }
        tokio::spawn(follow_changes(
            service.clone(),
            settings.sync_interval,
            shutdown_rx.clone(),
        ));
        tokio::spawn(maintain(
            service.clone(),
            settings.maintenance_interval,
            settings.rotate_after_encryptions,
            shutdown_rx.clone(),
        ));
        tokio::spawn(crate::domain::jobs::run_jobs(
            service.clone(),
            crate::domain::jobs::RunnerSettings {
                lease: settings.job_lease,
                batch: settings.job_batch_rows as i64,
                poll: Duration::from_millis(500),
                max_running: settings.job_max_running,
                max_running_per_tenant: settings.job_max_running_per_tenant,
            },
            shutdown_rx.clone(),
        ));
        tokio::spawn(refresh_metrics(
            service.clone(),
            settings.metrics_refresh_interval,
            settings.client_cert_expiry_warning,
            shutdown_rx.clone(),
        ));
        if let Some(after) = settings.memory_release_idle_after {
            tokio::spawn(crate::memory::release_when_idle(
                service.store().clone(),
                after,
                shutdown_rx.clone(),
            ));
        }
        if let Some(retention) = settings.audit_retention {
            tokio::spawn(crate::audit::prune_table(
                service.store().clone(),
                retention,
                shutdown_rx.clone(),
            ));
        }
        let certificate = Arc::new(crate::domain::cert_status::CertStatus::default());
        if let (Some(acme), Some(managed)) = (&settings.acme, &managed) {
            crate::acme::start(
                acme.clone(),
                service.clone(),
                managed.clone(),
                certificate.clone(),
                shutdown_rx.clone(),
            )
            .await?;
        }
        if !settings.secret_files.is_empty() {
            tokio::spawn(reload_secrets_on_sighup(
                settings.secret_files.clone(),
                service.store().clone(),
                shutdown_rx.clone(),
            ));
        }
        if let Some(tls) = tls.as_ref().filter(|t| t.mutual()) {
            tokio::spawn(crate::client_ca::follow(
                service.clone(),
                tls.clone(),
                shutdown_rx.clone(),
            ));
        }
        if let Some(tls) = &tls {
            tokio::spawn(reload_tls_on_sighup(tls.clone(), shutdown_rx));
        }
        let state = AppState::new(AppParts {
            certificate,
            audit: audit.clone(),
            service: service.clone(),
            guard: Arc::new(
                crate::domain::guard::AuthGuard::new(crate::domain::guard::GuardSettings {
                    rate_limit: settings.rate_limit,
                    max_failures: settings.auth_max_failures,
                    window: settings.auth_lockout,
                    unauthenticated_rate_limit: settings.unauthenticated_rate_limit,
                    audit_refused_per_minute: settings.audit_refused_per_minute,
                })
                .with_trusted_proxies(settings.trusted_proxies.clone()),
            ),
        });
        let router = http::router(
            state.clone(),
            RouterSettings {
                max_body_bytes: settings.max_body_bytes,
                request_timeout: settings.request_timeout,
                batch: http::BatchLimits {
                    max_items: settings.max_batch_items,
                    max_body_bytes: settings.max_batch_body_bytes,
                },
                max_concurrent_body_bytes: settings.max_concurrent_body_bytes,
                stream: http::StreamLimits {
                    max_concurrent: settings.stream_max_concurrent,
                    read_timeout: settings.stream_read_timeout,
                },
            },
        );
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {} (KEYWARD_LISTEN)", settings.listen))?;
        let local_addr = listener
            .local_addr()
            .with_context(|| format!("cannot read the address bound for {}", settings.listen))?;
        let ops = match settings.ops_listen {
            None => None,
            Some(addr) => {
                let ops_listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (KEYWARD_OPS_LISTEN)"))?;
                let ops_router = http::ops_router(state, settings.request_timeout);
                Some((ops_listener, ops_router))
            }
        };
        Ok(Application {
            listener,
            local_addr,
            service,
            router,
            tls,
            ops,
            rotate_after_encryptions: settings.rotate_after_encryptions,
            shutdown_timeout: settings.shutdown_timeout,
            connection_limits: server::ConnectionLimits {
                max_connections: settings.max_connections,
                max_connections_per_address: settings.max_connections_per_address,
                first_request_timeout: settings.connection_first_request_timeout,
                idle_timeout: settings.connection_idle_timeout,
                max_age: settings.connection_max_age,
                closing_grace: settings.request_timeout,
                evict_idle_at_limit: false,
            },
            ops_connection_limits: server::ConnectionLimits {
                max_connections: settings.ops_max_connections,
                // Probes come from one address (the kubelet's) and the
                // scraper from another: no single address may take every
                // slot of the ops listener.
                max_connections_per_address: settings
                    .max_connections_per_address
                    .min((settings.ops_max_connections / 2).max(1)),
                first_request_timeout: settings.connection_first_request_timeout,
                idle_timeout: settings.connection_idle_timeout,
                max_age: settings.connection_max_age,
                closing_grace: settings.request_timeout,
                // Probes and scrapers: at the limit, an idle connection is
                // closed rather than a probe left waiting.
                evict_idle_at_limit: true,
            },
            background,
            audit,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The TLS configuration, if HTTPS is on (dev mode reloads renewed
    /// dev certificates through it).
    pub fn tls(&self) -> Option<Arc<ReloadableTls>> {
        self.tls.clone()
    }

    /// The service (for dev-mode bootstrap).
    pub fn service(&self) -> &Arc<KeyService> {
        &self.service
    }

    /// Serves until `shutdown` completes, then lets requests in flight finish
    /// (for at most the shutdown timeout) and stops background tasks.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr();
        let scheme = match &self.tls {
            Some(t) if t.mutual() => "https (mutual TLS)",
            Some(_) => "https",
            None => "http",
        };
        tracing::info!(%addr, scheme, "listening");
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let ops = self.ops.map(|(listener, router)| {
            let ops_addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(addr = %ops_addr, "ops endpoints listening (plain HTTP)");
            let stop = stopped(stop_rx.clone());
            tokio::spawn(server::serve(
                "ops",
                listener,
                router,
                None,
                self.ops_connection_limits,
                stop,
                self.shutdown_timeout,
            ))
        });
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        server::serve(
            "api",
            self.listener,
            self.router,
            self.tls,
            self.connection_limits,
            stopped(stop_rx),
            self.shutdown_timeout,
        )
        .await;
        if let Some(ops) = ops {
            let _ = ops.await;
        }
        let _ = self.background.send(true);
        // Every request has answered: write out their audit records and a
        // checkpoint that covers them.
        if tokio::time::timeout(Duration::from_secs(10), self.audit.close())
            .await
            .is_err()
        {
            tracing::warn!("audit records still queued at shutdown; the rest may be lost");
        }
        if let Err(e) = self
            .service
            .flush_counts(self.rotate_after_encryptions)
            .await
        {
            tracing::warn!(error = %e, "could not flush the last use counts");
        }
        self.service.store().close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Flushes use counts and applies rotation policies every `interval`.
async fn maintain(
    service: Arc<KeyService>,
    interval: Duration,
    bound: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if service.not_ready_reason().is_some() {
            continue;
        }
        if let Err(e) = service.flush_counts(bound).await {
            tracing::warn!(error = %e, "could not flush use counts");
        }
        if let Err(e) = service.rotate_due().await {
            tracing::warn!(error = %e, "could not apply rotation periods");
        }
    }
}

/// Refreshes the `/metrics` figures that come from the database every
/// `interval` (and once at start), so that scrapes never query it.
async fn refresh_metrics(
    service: Arc<KeyService>,
    interval: Duration,
    cert_expiry_warning: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        http::metrics::refresh_database_gauges(&service, cert_expiry_warning).await;
    }
}

/// Retries loading the root keys with backoff while the provider is
/// unreachable; readiness reports the reason meanwhile.
/// How often a replica looks for a root-KEK rotation left unfinished (a
/// re-wrap that stopped on a database error, or a process that died).
const KEK_ROTATION_RETRY: Duration = Duration::from_secs(60);

/// Finishes any unfinished root-KEK rotation now and then every
/// [`KEK_ROTATION_RETRY`], so a re-wrap that stopped does not wait for the
/// next restart (one query a minute when there is nothing to do).
async fn keep_finishing_kek_rotations(
    service: Arc<KeyService>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        service.finish_kek_rotation().await;
        tokio::select! {
            _ = tokio::time::sleep(KEK_ROTATION_RETRY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn retry_root_keys(service: Arc<KeyService>, mut shutdown: watch::Receiver<bool>) {
    let mut delay = Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
        match service.load_root_keys().await {
            Ok(()) => {
                tracing::info!(
                    provider = service.provider().name(),
                    "master-key provider reachable: root key loaded, ready"
                );
                keep_finishing_kek_rotations(service, shutdown).await;
                return;
            }
            Err(RootKeyError::Provider(e)) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "master-key provider still unreachable");
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load the root key; not ready until restarted with the right master key");
                return;
            }
        }
    }
}

/// Re-reads the secrets given as `file://` references on every SIGHUP: the
/// Vault token or secret id and the PKCS#11 PIN take effect at the provider's
/// next login, the database URL for new connections. An unreadable file keeps
/// the old value. Logs setting names only.
async fn reload_secrets_on_sighup(
    files: crate::config::SecretFiles,
    store: Store,
    mut shutdown: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; secret files will not be re-read");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {}
                _ = shutdown.changed() => return,
            }
            for (setting, result) in files.reload() {
                match result {
                    Ok(changed) => {
                        tracing::info!(setting = %setting, changed, "SIGHUP: re-read the secret file");
                        if changed && setting == "KEYWARD_DATABASE_URL" {
                            let applied = match files.cell(&setting) {
                                Some(url) => store.replace_url(&url.get()),
                                None => Ok(()),
                            };
                            if let Err(e) = applied {
                                tracing::error!(error = %e, "SIGHUP: kept the previous database URL");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(setting = %setting, error = %e, "SIGHUP: kept the previous secret")
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (files, store, shutdown.changed().await);
    }
}

/// Reloads the TLS files on every SIGHUP; a bad file keeps the old configuration.
async fn reload_tls_on_sighup(tls: Arc<ReloadableTls>, mut shutdown: watch::Receiver<bool>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; TLS files will not be reloaded");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => match tls.reload() {
                    Ok(()) => tracing::info!("SIGHUP: reloaded the TLS certificate, key, CA and CRL files"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: kept the previous TLS configuration"),
                },
                _ = shutdown.changed() => return,
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (tls, shutdown.changed().await);
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Records the rotations Keyward makes by itself in the audit log, as
/// `rotate.automatic` by the `system` actor.
struct AuditRecorder(crate::audit::AuditLog);

impl crate::domain::service::SystemRecorder for AuditRecorder {
    fn rotated_automatically(
        &self,
        tenant: Option<crate::domain::TenantId>,
        encryption: crate::domain::EncryptionId,
        new_version: crate::domain::VersionId,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.0.record(crate::audit::AuditEvent {
            time_ms: crate::domain::time::now_ms(),
            operation: "rotate.automatic",
            actor: crate::audit::Actor::System,
            tenant_id: tenant,
            targets: vec![crate::audit::Target {
                encryption_id: Some(encryption),
                version_id: Some(new_version),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }
}
