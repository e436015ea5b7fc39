//! The commands that run a server or ready and probe one: `dev`, `serve`,
//! `migrate`, `healthcheck`.

use std::time::Duration;

use anyhow::Context;

use super::config_arg::ConfigArg;
use crate::config::LogFormat;
use crate::dev::{self, DevOptions};
use crate::startup::{open_store, shutdown_signal, Application};
use crate::telemetry;

/// `keyward dev`: the development server, logging text at `info`.
pub(super) async fn dev(options: DevOptions) -> anyhow::Result<()> {
    telemetry::init(LogFormat::Text, "info");
    dev::run(options).await
}

/// `keyward serve`: the production server, until a shutdown signal.
pub(super) async fn serve(config: &ConfigArg) -> anyhow::Result<()> {
    let settings = config.settings()?;
    telemetry::init(settings.log_format, &settings.log_level);
    let app = Application::build(&settings).await?;
    // The master key is no longer needed once the root KEK is unwrapped.
    drop(settings);
    app.run_until_stopped(shutdown_signal()).await
}

/// `keyward migrate`: opening the store applies the migrations.
pub(super) async fn migrate(config: &ConfigArg) -> anyhow::Result<()> {
    let settings = config.settings()?;
    telemetry::init(settings.log_format, &settings.log_level);
    open_store(&settings).await?.close().await;
    eprintln!("migrations applied");
    Ok(())
}

/// `keyward healthcheck`: succeeds if `url`/healthz answers 2xx within 3 s.
pub(super) async fn healthcheck(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let status = client
        .get(format!("{}/healthz", url.trim_end_matches('/')))
        .send()
        .await
        .with_context(|| format!("{url} does not answer"))?
        .status();
    if !status.is_success() {
        anyhow::bail!("{url}/healthz answered {status}");
    }
    Ok(())
}
