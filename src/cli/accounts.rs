//! `keyward tenant` and `keyward apikey`: tenants and their API keys, straight
//! on the database (no running server needed). A secret is printed once, at
//! creation, and never stored: only its digest is.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::config_arg::ConfigArg;
use crate::domain::accounts;
use crate::domain::apikeys::{IssuedCredential, Scopes};
use crate::domain::TenantId;
use crate::startup::open_store;

/// The `tenant` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum TenantCommand {
    /// Create a tenant and an all-scopes API key for it.
    Create {
        /// The tenant's unique name.
        name: String,
        /// Print {"tenantId","name","apiKey","apiSecret"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// The `apikey` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum ApikeyCommand {
    /// Create an API key for a tenant.
    Create {
        /// The tenant's id.
        #[arg(long, value_name = "ID")]
        tenant: String,
        /// Comma-separated scopes: encrypt, decrypt, rotate, manage, admin.
        #[arg(long, value_name = "LIST")]
        scopes: String,
        /// Bind the key to this client certificate (PEM): requests with the key
        /// must come over mutual TLS with a certificate for the same public key.
        #[arg(long, value_name = "PEM")]
        bind_cert: Option<PathBuf>,
        /// Print {"apiKey","apiSecret","scopes","boundCertificateSpkiSha256"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke an API key; running servers drop it within one sync interval.
    Revoke {
        /// The API key id (kw_...).
        key: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Runs a `tenant` subcommand.
pub(super) async fn run_tenant(command: TenantCommand) -> anyhow::Result<()> {
    match command {
        TenantCommand::Create { name, json, config } => create_tenant(&name, json, &config).await,
    }
}

/// Runs an `apikey` subcommand.
pub(super) async fn run_apikey(command: ApikeyCommand) -> anyhow::Result<()> {
    match command {
        ApikeyCommand::Create {
            tenant,
            scopes,
            bind_cert,
            json,
            config,
        } => create_api_key(&tenant, &scopes, bind_cert.as_deref(), json, &config).await,
        ApikeyCommand::Revoke { key, config } => revoke_api_key(&key, &config).await,
    }
}

async fn create_tenant(name: &str, json: bool, config: &ConfigArg) -> anyhow::Result<()> {
    let store = open_store(&config.settings()?).await?;
    let created = accounts::create_tenant(&store, name).await?;
    store.close().await;
    if json {
        println!(
            "{}",
            json!({
                "tenantId": created.tenant.id.to_string(),
                "name": created.tenant.name,
                "apiKey": created.credential.key_id,
                "apiSecret": created.credential.secret.as_str(),
            })
        );
    } else {
        println!("tenant id:  {}", created.tenant.id);
        println!("name:       {}", created.tenant.name);
        print_credential(&created.credential);
    }
    Ok(())
}

async fn create_api_key(
    tenant: &str,
    scopes: &str,
    bind_cert: Option<&Path>,
    json: bool,
    config: &ConfigArg,
) -> anyhow::Result<()> {
    // Every argument is checked before the database is opened.
    let tenant: TenantId = tenant
        .parse()
        .map_err(|_| anyhow::anyhow!("--tenant: `{tenant}` is not a tenant id (a UUID)"))?;
    let scopes = Scopes::parse(scopes).map_err(|e| anyhow::anyhow!("--scopes: {e}"))?;
    let binding = bind_cert.map(crate::tls::spki_sha256_of_pem).transpose()?;
    let store = open_store(&config.settings()?).await?;
    let credential = accounts::create_api_key(&store, tenant, scopes, binding).await?;
    store.close().await;
    if json {
        println!(
            "{}",
            json!({
                "apiKey": credential.key_id,
                "apiSecret": credential.secret.as_str(),
                "scopes": scopes.names(),
                "boundCertificateSpkiSha256": binding.map(|d| crate::crypto::hex(&d)),
            })
        );
    } else {
        print_credential(&credential);
        println!("scopes:     {scopes}");
        if let Some(d) = binding {
            println!(
                "bound to:   client certificate with SPKI SHA-256 {}",
                crate::crypto::hex(&d)
            );
        }
    }
    Ok(())
}

async fn revoke_api_key(key: &str, config: &ConfigArg) -> anyhow::Result<()> {
    let store = open_store(&config.settings()?).await?;
    let revoked = accounts::revoke_api_key(&store, key).await?;
    store.close().await;
    if !revoked {
        anyhow::bail!("no live API key `{key}`");
    }
    eprintln!("revoked {key}");
    Ok(())
}

/// The two lines of a new API key, in the text output of both commands that
/// make one.
fn print_credential(credential: &IssuedCredential) {
    println!("api key:    {}", credential.key_id);
    println!(
        "api secret: {}  (shown once; not stored)",
        credential.secret.as_str()
    );
}
