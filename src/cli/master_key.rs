//! `keyward master-key`: offline work on the root KEKs, straight on the
//! database, with the provider(s) from the settings: migrate to another
//! provider, rotate the root KEK, show the status.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use super::config_arg::ConfigArg;
use crate::domain::service::{migrate_master_key, KeyService};
use crate::master_key::{self, ProviderKind};
use crate::startup::open_store;
use crate::telemetry;

/// The `master-key` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum MasterKeyCommand {
    /// Re-wrap the root KEK under another provider, in one transaction. The
    /// current provider is KEYWARD_MASTER_KEY_PROVIDER; the target's settings
    /// come from its own variables (KEYWARD_NEW_MASTER_KEY for env to env).
    Migrate {
        /// The target provider: env, aws-kms, vault, tpm or azure-key-vault.
        #[arg(long, value_name = "PROVIDER")]
        to: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Make a new root KEK and re-wrap every key version under it, batch by
    /// batch. Resumable: interrupted, it continues at the next run (or when a
    /// server starts).
    RotateKek {
        /// Versions per transaction.
        #[arg(long, default_value_t = 500)]
        batch_size: u32,
        /// Pause between batches, in milliseconds (to spare the database).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// Only finish an interrupted rotation; start no new one.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show the root KEKs, their provider and how many versions each wraps.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Runs a `master-key` subcommand.
pub(super) async fn run(command: MasterKeyCommand) -> anyhow::Result<()> {
    match command {
        MasterKeyCommand::Migrate { to, config } => migrate(&to, &config).await,
        MasterKeyCommand::RotateKek {
            batch_size,
            pause_ms,
            resume,
            config,
        } => rotate_kek(batch_size, Duration::from_millis(pause_ms), resume, &config).await,
        MasterKeyCommand::Status { json, config } => status(json, &config).await,
    }
}

async fn migrate(to: &str, config: &ConfigArg) -> anyhow::Result<()> {
    let settings = config.settings()?;
    let target = ProviderKind::parse(to).ok_or_else(|| {
        anyhow::anyhow!("--to: `{to}` is not a provider ({})", ProviderKind::NAMES)
    })?;
    let from = settings.provider_settings(settings.master_key_provider, false)?;
    let from = master_key::build(from).await?;
    let env_to_env =
        target == ProviderKind::Env && settings.master_key_provider == ProviderKind::Env;
    let to_provider = master_key::build(settings.provider_settings(target, env_to_env)?).await?;
    let store = open_store(&settings).await?;
    let n = migrate_master_key(&store, from.as_ref(), to_provider.as_ref()).await?;
    store.close().await;
    eprintln!(
        "re-wrapped {n} root KEK(s) from `{}` to `{}`; start Keyward with KEYWARD_MASTER_KEY_PROVIDER={}{}",
        settings.master_key_provider.as_str(),
        target.as_str(),
        target.as_str(),
        if env_to_env { " and the new KEYWARD_MASTER_KEY" } else { "" }
    );
    Ok(())
}

async fn rotate_kek(
    batch_size: u32,
    pause: Duration,
    resume: bool,
    config: &ConfigArg,
) -> anyhow::Result<()> {
    let settings = config.settings()?;
    telemetry::init(settings.log_format, &settings.log_level);
    let provider = settings.provider_settings(settings.master_key_provider, false)?;
    let provider = master_key::build(provider).await?;
    let store = open_store(&settings).await?;
    let service = KeyService::new(store.clone(), provider, 1);
    service
        .load_root_keys()
        .await
        .context("cannot load the root key")?;
    if !resume {
        let kek = match service.rotate_root_kek().await {
            Err(crate::domain::service::KeyError::RotationInProgress) => anyhow::bail!(
                "a root KEK rotation is already in progress; finish it with `keyward master-key rotate-kek --resume`"
            ),
            other => other?,
        };
        eprintln!("new root KEK {kek}; re-wrapping every key version under it");
    }
    let n = service
        .rewrap_retiring(batch_size.max(1), pause, |done, total| {
            eprintln!("re-wrapped {done}/{total}");
        })
        .await?;
    store.close().await;
    eprintln!("done: {n} key version(s) re-wrapped; old root KEKs retired");
    Ok(())
}

async fn status(json: bool, config: &ConfigArg) -> anyhow::Result<()> {
    let store = open_store(&config.settings()?).await?;
    let keks = store.root_keks().await?;
    let counts = store.versions_per_kek().await?;
    store.close().await;
    let rows = keks.iter().map(|k| {
        let versions = counts
            .iter()
            .find(|(id, _)| *id == k.id)
            .map_or(0, |(_, n)| *n);
        (k, versions)
    });
    if json {
        let rows: Vec<_> = rows
            .map(|(k, versions)| {
                let mut row = json!({"kekId": k.id.to_string(), "state": k.state.as_str(), "provider": k.provider, "versions": versions});
                if let Some(e) = &k.rewrap_error {
                    row["rewrapError"] = json!(e);
                }
                row
            })
            .collect();
        println!("{}", json!({"rootKeks": rows}));
    } else {
        for (k, versions) in rows {
            println!(
                "{}  {:8}  provider={}  versions={versions}",
                k.id,
                k.state.as_str(),
                k.provider
            );
            if let Some(e) = &k.rewrap_error {
                println!("    re-wrap stopped: {e}");
            }
        }
    }
    Ok(())
}
