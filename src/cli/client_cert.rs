//! `keyward client-cert`: client certificates from the client CA Keyward
//! holds itself (see `client_ca`), straight on the database with the master
//! key, like `keyward master-key rotate-kek`. Each issue and revocation is
//! audited (actor `operator_cli`) in the database's audit table; the CLI
//! writes no audit file, which belongs to the running server's chain.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use serde_json::json;

use super::config_arg::ConfigArg;
use crate::audit::{Actor, AuditEvent, AuditLog, Destination, Target};
use crate::client_ca::{self, IssuedClientCert};
use crate::domain::service::KeyService;
use crate::domain::time::{now_ms, rfc3339};
use crate::startup::open_store;
use crate::store::ClientCertRow;

/// The `client-cert` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum ClientCertCommand {
    /// Issue a client certificate from the Keyward client CA (made on first
    /// use) and bind the API key to it in the same step: from then on the key
    /// works only over mutual TLS with this certificate. Writes
    /// DIR/KEY.crt.pem, DIR/KEY.key.pem (mode 0600) and
    /// DIR/keyward-client-ca.pem. Issuing again for the same key (renewal)
    /// binds it to the new certificate.
    Issue {
        /// The tenant's id.
        #[arg(long, value_name = "ID")]
        tenant: String,
        /// The tenant's API key to bind (kw_...).
        #[arg(long, value_name = "KEY")]
        api_key: String,
        /// Validity in days (1 to 365).
        #[arg(
            long,
            value_name = "N",
            default_value_t = 90,
            conflicts_with = "lifetime"
        )]
        days: u32,
        /// Validity as a duration (`12h`, `30m`), for certificates shorter
        /// than a day.
        #[arg(long, value_name = "DURATION")]
        lifetime: Option<String>,
        /// Where to write the files.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        /// Print {"serial","tenantId","apiKey","spkiSha256","notAfter","certFile","keyFile","caFile"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke client certificates: they go on the CRL that every mutual-TLS
    /// listener enforces, within one sync interval and without a restart.
    Revoke {
        /// The certificate's serial number (hex; colons allowed).
        #[arg(
            long,
            value_name = "S",
            required_unless_present = "api_key",
            conflicts_with = "api_key"
        )]
        serial: Option<String>,
        /// Every live certificate issued for this API key.
        #[arg(long, value_name = "KEY")]
        api_key: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List the certificates issued, one JSON object per line (live ones
    /// only, unless --all).
    List {
        /// Revoked and expired ones too.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Runs a `client-cert` subcommand.
pub(super) async fn run(command: ClientCertCommand) -> anyhow::Result<()> {
    match command {
        ClientCertCommand::Issue {
            tenant,
            api_key,
            days,
            lifetime,
            out,
            json,
            config,
        } => {
            let lifetime = match lifetime {
                Some(text) => humantime::parse_duration(&text)
                    .map_err(|e| anyhow::anyhow!("--lifetime: `{text}`: {e}"))?,
                None => Duration::from_secs(u64::from(days) * 86_400),
            };
            if lifetime.is_zero() || lifetime > client_ca::MAX_LIFETIME {
                anyhow::bail!("--days/--lifetime: between 1 second and 365 days");
            }
            let tenant: crate::domain::TenantId = tenant
                .parse()
                .map_err(|_| anyhow::anyhow!("--tenant: `{tenant}` is not a tenant id (a UUID)"))?;
            issue(tenant, &api_key, lifetime, &out, json, &config).await
        }
        ClientCertCommand::Revoke {
            serial,
            api_key,
            config,
        } => revoke(serial.as_deref(), api_key.as_deref(), &config).await,
        ClientCertCommand::List { all, config } => list(all, &config).await,
    }
}

/// The service with the root keys loaded, and an audit log writing to the
/// table only.
async fn open(config: &ConfigArg) -> anyhow::Result<(KeyService, AuditLog)> {
    let settings = config.settings()?;
    let provider = settings.provider_settings(settings.master_key_provider, false)?;
    let provider = crate::master_key::build(provider).await?;
    let store = open_store(&settings).await?;
    let audit = AuditLog::start(
        &Destination::TableOnly,
        Some(store.clone()),
        settings.audit_checkpoints,
    )?;
    let service = KeyService::new(store, provider, 1);
    service
        .load_root_keys()
        .await
        .context("cannot load the root key")?;
    Ok((service, audit))
}

/// The audit event of an issue or revocation of `cert`.
fn event(operation: &'static str, cert: &ClientCertRow, der: Option<&[u8]>) -> AuditEvent {
    AuditEvent {
        time_ms: now_ms(),
        operation,
        actor: Actor::OperatorCli,
        tenant_id: cert.tenant_id.parse().ok(),
        client: der
            .and_then(crate::tls::client_identity)
            .map(std::sync::Arc::new),
        targets: vec![Target {
            api_key_id: Some(cert.api_key_id.clone()),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn issue(
    tenant: crate::domain::TenantId,
    api_key: &str,
    lifetime: Duration,
    out: &Path,
    json: bool,
    config: &ConfigArg,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (service, audit) = open(config).await?;
    let issued = client_ca::issue(&service, &tenant.to_string(), api_key, lifetime).await;
    let issued = match issued {
        Ok(issued) => issued,
        Err(e) => {
            audit.close().await;
            service.store().close().await;
            return Err(e);
        }
    };
    let der = rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).ok();
    audit
        .record(event("client_cert.issue", &issued.row, der.as_deref()))
        .await;
    audit.close().await;
    service.store().close().await;
    let files = write_files(&issued, out, api_key)?;
    let row = &issued.row;
    if json {
        println!(
            "{}",
            json!({
                "serial": row.serial,
                "tenantId": row.tenant_id,
                "apiKey": row.api_key_id,
                "spkiSha256": crate::crypto::hex(&row.spki_sha256),
                "notAfter": rfc3339(row.not_after),
                "certFile": files.0,
                "keyFile": files.1,
                "caFile": files.2,
            })
        );
    } else {
        println!("serial:     {}", row.serial);
        println!(
            "api key:    {} (now bound to this certificate)",
            row.api_key_id
        );
        println!("not after:  {}", rfc3339(row.not_after));
        println!("cert:       {}", files.0.display());
        println!(
            "key:        {}  (mode 0600; not stored by Keyward)",
            files.1.display()
        );
        println!("client CA:  {}", files.2.display());
    }
    Ok(())
}

/// Writes the certificate, the key (owner-only, replacing an older one
/// atomically) and the CA certificate; returns their paths.
fn write_files(
    issued: &IssuedClientCert,
    out: &Path,
    api_key: &str,
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    use std::io::Write;
    let cert = out.join(format!("{api_key}.crt.pem"));
    let key = out.join(format!("{api_key}.key.pem"));
    let ca = out.join("keyward-client-ca.pem");
    let partial = out.join(format!(".{api_key}.key.pem.{}", uuid::Uuid::new_v4()));
    let written = (|| -> std::io::Result<()> {
        let mut f = crate::owner_only::owner_only_options()
            .write(true)
            .create_new(true)
            .open(&partial)?;
        f.write_all(issued.key_pem.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&partial, &key)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e).with_context(|| format!("cannot write {}", key.display()));
    }
    std::fs::write(&cert, &issued.cert_pem)
        .with_context(|| format!("cannot write {}", cert.display()))?;
    std::fs::write(&ca, &issued.ca_pem)
        .with_context(|| format!("cannot write {}", ca.display()))?;
    Ok((cert, key, ca))
}

async fn revoke(
    serial: Option<&str>,
    api_key: Option<&str>,
    config: &ConfigArg,
) -> anyhow::Result<()> {
    let (service, audit) = open(config).await?;
    let revoked = client_ca::revoke(&service, serial, api_key).await;
    if let Ok(revoked) = &revoked {
        for cert in revoked {
            audit.record(event("client_cert.revoke", cert, None)).await;
        }
    }
    audit.close().await;
    service.store().close().await;
    let revoked = revoked?;
    if revoked.is_empty() {
        anyhow::bail!("no live certificate matches");
    }
    for cert in &revoked {
        eprintln!(
            "revoked {} (API key {}); every listener refuses it within one sync interval",
            cert.serial, cert.api_key_id
        );
    }
    Ok(())
}

async fn list(all: bool, config: &ConfigArg) -> anyhow::Result<()> {
    let store = open_store(&config.settings()?).await?;
    let mut after: Option<(i64, String)> = None;
    let result = async {
        loop {
            let page = store
                .client_certificates(
                    after.as_ref().map(|(t, s)| (*t, s.as_str())),
                    !all,
                    now_ms(),
                    500,
                )
                .await?;
            for c in &page {
                println!(
                    "{}",
                    json!({
                        "serial": c.serial,
                        "tenantId": c.tenant_id,
                        "apiKey": c.api_key_id,
                        "spkiSha256": crate::crypto::hex(&c.spki_sha256),
                        "notBefore": rfc3339(c.not_before),
                        "notAfter": rfc3339(c.not_after),
                        "revokedAt": c.revoked_at.map(rfc3339),
                        "bound": c.bound,
                    })
                );
            }
            match page.last() {
                Some(last) if page.len() == 500 => {
                    after = Some((last.issued_at, last.serial.clone()))
                }
                _ => return Ok::<(), anyhow::Error>(()),
            }
        }
    }
    .await;
    store.close().await;
    result
}
