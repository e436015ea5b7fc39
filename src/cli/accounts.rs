//! `keyward tenant`, `keyward apikey` and `keyward operator-key`: tenants,
//! their API keys and operator keys, straight on the database (no running
//! server needed; the same operations exist over the API for an operator key,
//! see `docs/api.md`). A secret is printed once, at creation, and never
//! stored: only its digest is.

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
    /// Create a tenant and an API key with every tenant scope (encrypt,
    /// decrypt, rotate, manage, admin): everything inside the tenant, nothing
    /// outside it.
    Create {
        /// The tenant's unique name.
        name: String,
        /// Print {"tenantId","name","apiKey","apiSecret"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Disable a tenant: its API keys stop working on every running server
    /// within one sync interval.
    Disable {
        /// The tenant's id.
        tenant: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// The `operator-key` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum OperatorKeyCommand {
    /// Create an operator API key: it belongs to no tenant, manages tenants
    /// and their keys, the root KEK, and reads every tenant's audit records; it
    /// cannot encrypt, decrypt or touch any tenant's encryptions.
    Create {
        /// Comma-separated scopes: operator (tenants, API keys, root KEK),
        /// audit (read every tenant's audit records).
        #[arg(long, value_name = "LIST", default_value = "operator,audit")]
        scopes: String,
        /// Bind the key to this client certificate (PEM).
        #[arg(long, value_name = "PEM")]
        bind_cert: Option<PathBuf>,
        /// Print {"apiKey","apiSecret","scopes","boundCertificateSpkiSha256"}.
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
        /// Comma-separated scopes: encrypt, decrypt, rotate, manage, admin, index
        /// (the administration of its own tenant only).
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
    /// List a tenant's API keys (never a secret or digest).
    List {
        /// The tenant's id.
        #[arg(long, value_name = "ID")]
        tenant: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke an API key (a tenant's or an operator's); running servers drop it
    /// within one sync interval.
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
        TenantCommand::Disable { tenant, config } => disable_tenant(&tenant, &config).await,
    }
}

/// Runs an `operator-key` subcommand.
pub(super) async fn run_operator_key(command: OperatorKeyCommand) -> anyhow::Result<()> {
    match command {
        OperatorKeyCommand::Create {
            scopes,
            bind_cert,
            json,
            config,
        } => create_operator_key(&scopes, bind_cert.as_deref(), json, &config).await,
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
        ApikeyCommand::List { tenant, config } => list_api_keys(&tenant, &config).await,
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
    let tenant = tenant_arg(tenant, "--tenant")?;
    let scopes = Scopes::parse(scopes).map_err(|e| anyhow::anyhow!("--scopes: {e}"))?;
    scopes.check_kind(true).map_err(|e| {
        anyhow::anyhow!("--scopes: {e} (operator keys: `keyward operator-key create`)")
    })?;
    let binding = bind_cert.map(crate::tls::spki_sha256_of_pem).transpose()?;
    let settings = config.settings()?;
    let store = open_store(&settings).await?;
    let credential = accounts::create_api_key(
        &store,
        tenant,
        scopes,
        binding,
        settings.max_api_keys_per_tenant,
    )
    .await;
    store.close().await;
    print_key(&credential?, scopes, binding, json);
    Ok(())
}

fn tenant_arg(tenant: &str, flag: &str) -> anyhow::Result<TenantId> {
    tenant
        .parse()
        .map_err(|_| anyhow::anyhow!("{flag}: `{tenant}` is not a tenant id (a UUID)"))
}

async fn create_operator_key(
    scopes: &str,
    bind_cert: Option<&Path>,
    json: bool,
    config: &ConfigArg,
) -> anyhow::Result<()> {
    let scopes = Scopes::parse(scopes).map_err(|e| anyhow::anyhow!("--scopes: {e}"))?;
    scopes
        .check_kind(false)
        .map_err(|e| anyhow::anyhow!("--scopes: {e}"))?;
    let binding = bind_cert.map(crate::tls::spki_sha256_of_pem).transpose()?;
    let store = open_store(&config.settings()?).await?;
    let credential = accounts::create_operator_key(&store, scopes, binding).await;
    store.close().await;
    print_key(&credential?, scopes, binding, json);
    Ok(())
}

async fn disable_tenant(tenant: &str, config: &ConfigArg) -> anyhow::Result<()> {
    let tenant = tenant_arg(tenant, "tenant")?;
    let store = open_store(&config.settings()?).await?;
    let changed = accounts::disable_tenant(&store, tenant).await;
    store.close().await;
    if changed? {
        eprintln!("disabled tenant {tenant}");
    } else {
        eprintln!("tenant {tenant} was already disabled");
    }
    Ok(())
}

async fn list_api_keys(tenant: &str, config: &ConfigArg) -> anyhow::Result<()> {
    let tenant = tenant_arg(tenant, "--tenant")?;
    let store = open_store(&config.settings()?).await?;
    let listed = print_api_keys(&store, tenant).await;
    store.close().await;
    listed
}

/// Prints every key of `tenant`, one JSON line each, page after page: the
/// listing never stops at a page's end, so no key can hide behind others.
async fn print_api_keys(store: &crate::store::Store, tenant: TenantId) -> anyhow::Result<()> {
    let mut after = None;
    loop {
        let page =
            accounts::api_keys(store, Some(tenant), after.as_ref(), accounts::LIST_LIMIT).await?;
        for k in &page {
            println!(
                "{}",
                json!({
                    "apiKey": k.key_id,
                    "scopes": k.scopes.names(),
                    "boundCertificateSpkiSha256": k.cert_spki_sha256.map(|d| crate::crypto::hex(&d)),
                    "createdAt": crate::domain::time::rfc3339(k.created_at),
                    "revokedAt": k.revoked_at.map(crate::domain::time::rfc3339),
                })
            );
        }
        match page.last() {
            Some(last) if page.len() as i64 == accounts::LIST_LIMIT => {
                after = Some(accounts::ApiKeyCursor::after(last));
            }
            _ => return Ok(()),
        }
    }
}

/// Prints a new key: JSON, or lines for people.
fn print_key(credential: &IssuedCredential, scopes: Scopes, binding: Option<[u8; 32]>, json: bool) {
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
        print_credential(credential);
        println!("scopes:     {scopes}");
        if let Some(d) = binding {
            println!(
                "bound to:   client certificate with SPKI SHA-256 {}",
                crate::crypto::hex(&d)
            );
        }
    }
}

async fn revoke_api_key(key: &str, config: &ConfigArg) -> anyhow::Result<()> {
    let store = open_store(&config.settings()?).await?;
    let revoked = accounts::revoke_api_key(&store, key, None).await?;
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
