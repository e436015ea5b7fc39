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
use crate::domain::sync::follow_changes;
use crate::http::{self, AppState, RouterSettings};
use crate::master_key::{EnvMasterKey, MasterKeyProvider};
use crate::store::{Store, StoreError};

/// A built, bound, not yet serving Keyward.
pub struct Application {
    listener: TcpListener,
    service: Arc<KeyService>,
    router: axum::Router,
    shutdown_timeout: Duration,
    background: watch::Sender<bool>,
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

impl Application {
    /// Builds everything and binds the listener (port 0 picks a free port).
    pub async fn build(settings: &Settings) -> anyhow::Result<Application> {
        let master_key = settings.master_key.as_ref().context(
            "KEYWARD_MASTER_KEY is required: base64 of 32 random bytes (generate one with `openssl rand -base64 32`)",
        )?;
        let provider: Box<dyn MasterKeyProvider> = Box::new(EnvMasterKey::new(master_key));
        let store = open_store(settings).await?;
        let service = Arc::new(
            KeyService::start(store, provider.as_ref(), settings.key_ring_capacity)
                .await
                .context("cannot load the root key")?,
        );
        let (background, shutdown_rx) = watch::channel(false);
        tokio::spawn(follow_changes(
            service.clone(),
            settings.sync_interval,
            shutdown_rx,
        ));
        let router = http::router(
            AppState {
                service: service.clone(),
            },
            RouterSettings {
                max_body_bytes: settings.max_body_bytes,
                request_timeout: settings.request_timeout,
            },
        );
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {} (KEYWARD_LISTEN)", settings.listen))?;
        Ok(Application {
            listener,
            service,
            router,
            shutdown_timeout: settings.shutdown_timeout,
            background,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
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
        tracing::info!(%addr, "listening");
        let (stopping_tx, mut stopping_rx) = watch::channel(false);
        let server = axum::serve(
            self.listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing requests in flight");
            let _ = stopping_tx.send(true);
        });
        let grace = self.shutdown_timeout;
        let deadline = async move {
            let _ = stopping_rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            result = server => result.context("the server failed")?,
            _ = deadline => tracing::warn!("requests still in flight after the shutdown timeout; stopping anyway"),
        }
        let _ = self.background.send(true);
        self.service.store().close().await;
        tracing::info!("stopped");
        Ok(())
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
