//! `keyward dev`: one command, no setup. Embedded SQLite and a generated master
//! key in a data folder, a dev tenant with an all-scopes API key, a sample
//! encryption, plain HTTP on loopback, and curl examples that work when pasted.
//! Restarting on the same folder keeps every key.
//!
//! [`certs`] makes the certificates of `keyward dev --tls`; `private` writes
//! the files only their owner may read.

pub mod certs;
mod private;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::{parse_master_key, DatabaseUrl, Settings};
use crate::crypto::{random_bytes, DataKey};
use crate::domain::accounts::{self, AccountError};
use crate::domain::apikeys::{IssuedCredential, Scopes};
use crate::domain::service::KeyService;
use crate::domain::{EncryptionId, TenantId};
use crate::startup::{shutdown_signal, Application};
use crate::telemetry::LogFormat;
use crate::tls::{ServerCert, TlsFiles};

use certs::DevCerts;
use private::{create_private_dir, write_private};

/// Options of `keyward dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Where the database, master key and dev credentials live.
    pub data_dir: Option<PathBuf>,
    /// Where to listen (loopback only).
    pub listen: SocketAddr,
    /// Where to write the dev credentials as JSON once serving.
    pub credentials_out: Option<PathBuf>,
    /// Serve mutual TLS with generated dev certificates.
    pub tls: bool,
    /// A job sources file (the same format as `job_sources_file`).
    pub job_sources: Option<PathBuf>,
}

/// The dev tenant's credentials and an operator key, kept in the data folder
/// so that a restart prints the same working examples.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DevCredentials {
    tenant_id: String,
    api_key: String,
    api_secret: String,
    encryption_id: String,
    /// An operator key (tenants, API keys, root KEK, every tenant's audit);
    /// absent from files written before operator keys existed.
    #[serde(default)]
    operator_api_key: String,
    #[serde(default)]
    operator_api_secret: String,
}

/// The default data folder: `$XDG_DATA_HOME/keyward-dev`, else
/// `~/.local/share/keyward-dev`, else `./.keyward-dev`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("keyward-dev");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/keyward-dev");
    }
    PathBuf::from(".keyward-dev")
}

/// Runs dev mode until SIGTERM or Ctrl-C.
pub async fn run(opts: DevOptions) -> anyhow::Result<()> {
    if !opts.listen.ip().is_loopback() {
        bail!(
            "keyward dev listens on loopback only (got {}); use `keyward serve` for anything else",
            opts.listen
        );
    }
    let data_dir = opts.data_dir.clone().unwrap_or_else(default_data_dir);
    create_private_dir(&data_dir)?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", data_dir.display()))?;
    let master_key = load_or_create_master_key(&data_dir.join("master.key"))?;
    let mut settings = Settings::with_defaults(DatabaseUrl::new(format!(
        "sqlite://{}",
        data_dir.join("keyward.db").display()
    )))?;
    settings.listen = opts.listen;
    settings.master_key = Some(master_key);
    settings.log_format = LogFormat::Text;
    if let Some(file) = &opts.job_sources {
        settings.job_sources =
            crate::config::read_job_sources(file, &crate::config::resolve_reference)
                .map_err(|e| anyhow::anyhow!("--job-sources {}: {e}", file.display()))?;
    }
    // Standard output carries the banner; the audit log gets its own file.
    settings.audit = crate::audit::Destination::File(data_dir.join("audit.jsonl"));
    let certs = if opts.tls {
        let certs = certs::ensure(&data_dir.join("tls"))?;
        settings.tls = Some(TlsFiles {
            server: ServerCert::Files {
                cert: certs.server_cert.clone(),
                key: certs.server_key.clone(),
            },
            client_ca: Some(certs.ca.clone()),
            client_crl: None,
        });
        Some(certs)
    } else {
        None
    };

    let app = Application::build(&settings).await?;
    let creds = load_or_create_credentials(app.service(), &data_dir).await?;
    let addr = app.local_addr();
    print_banner(app.service(), &data_dir, addr, &creds, certs.as_ref()).await?;
    if let Some(path) = &opts.credentials_out {
        write_private(path, &serde_json::to_vec_pretty(&creds)?)
            .with_context(|| format!("cannot write --credentials-out {}", path.display()))?;
    }
    if let (Some(tls), Some(_)) = (app.tls(), &certs) {
        tokio::spawn(renew_dev_certificates(data_dir.join("tls"), tls));
    }
    app.run_until_stopped(shutdown_signal()).await
}

fn load_or_create_master_key(path: &Path) -> anyhow::Result<DataKey> {
    if path.exists() {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        );
        return parse_master_key(&text).map_err(|reason| {
            anyhow::anyhow!("the dev master key in {} {reason}", path.display())
        });
    }
    let key = DataKey::generate();
    let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.expose()));
    write_private(path, format!("{}\n", text.as_str()).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(key)
}

async fn load_or_create_credentials(
    service: &KeyService,
    data_dir: &Path,
) -> anyhow::Result<DevCredentials> {
    let path = data_dir.join("dev-credentials.json");
    if let Ok(bytes) = std::fs::read(&path) {
        if let Ok(mut creds) = serde_json::from_slice::<DevCredentials>(&bytes) {
            if still_valid(service, &creds).await {
                if !operator_key_valid(service, &creds).await {
                    let operator = new_operator_key(service).await?;
                    creds.operator_api_key = operator.key_id.clone();
                    creds.operator_api_secret = operator.secret.to_string();
                    write_private(&path, &serde_json::to_vec_pretty(&creds)?)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                return Ok(creds);
            }
        }
        tracing::warn!(path = %path.display(), "the saved dev credentials no longer work; creating new ones");
    }
    let store = service.store();
    let mut name = "dev".to_string();
    let tenant = loop {
        match accounts::create_tenant(store, &name).await {
            Ok(t) => break t,
            Err(AccountError::TenantExists(_)) => {
                name = format!("dev-{:04x}", u16::from_le_bytes(random_bytes()));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let encryption = service
        .create_encryption(
            tenant.tenant.id,
            crate::domain::service::EncryptionOptions::aes(Some("sample".into())),
            None,
        )
        .await?;
    let operator = new_operator_key(service).await?;
    let creds = DevCredentials {
        tenant_id: tenant.tenant.id.to_string(),
        api_key: tenant.credential.key_id.clone(),
        api_secret: tenant.credential.secret.to_string(),
        encryption_id: encryption.encryption.id.to_string(),
        operator_api_key: operator.key_id.clone(),
        operator_api_secret: operator.secret.to_string(),
    };
    write_private(&path, &serde_json::to_vec_pretty(&creds)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(creds)
}

async fn new_operator_key(service: &KeyService) -> anyhow::Result<IssuedCredential> {
    Ok(accounts::create_operator_key(service.store(), Scopes::operator_all(), None).await?)
}

async fn operator_key_valid(service: &KeyService, creds: &DevCredentials) -> bool {
    matches!(
        service
            .authenticate(&creds.operator_api_key, &creds.operator_api_secret)
            .await,
        Ok(p) if p.tenant_id.is_none()
    )
}

async fn still_valid(service: &KeyService, creds: &DevCredentials) -> bool {
    let (Ok(tenant), Ok(enc)) = (
        creds.tenant_id.parse::<TenantId>(),
        creds.encryption_id.parse::<EncryptionId>(),
    ) else {
        return false;
    };
    match service
        .authenticate(&creds.api_key, &creds.api_secret)
        .await
    {
        Ok(p) if p.tenant_id == Some(tenant) => {
            service.encryption_details(tenant, enc).await.is_ok()
        }
        _ => false,
    }
}

async fn print_banner(
    service: &KeyService,
    data_dir: &Path,
    addr: SocketAddr,
    creds: &DevCredentials,
    certs: Option<&DevCerts>,
) -> anyhow::Result<()> {
    let tenant: TenantId = creds.tenant_id.parse()?;
    let enc: EncryptionId = creds.encryption_id.parse()?;
    let sample = service
        .encrypt(tenant, enc, None, b"hello, keyward", b"", None)
        .await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (base, transport, tls_args) = match certs {
        None => (
            format!("http://{addr}"),
            "Plain HTTP on loopback",
            String::new(),
        ),
        Some(c) => (
            format!("https://localhost:{}", addr.port()),
            "Mutual TLS with a generated dev CA (certificates in the tls/ folder)",
            format!(
                "--cacert {} --cert {} --key {} ",
                c.ca.display(),
                c.client_cert.display(),
                c.client_key.display()
            ),
        ),
    };
    let auth = format!(
        "{tls_args}-H 'Content-Type: application/json' -H 'X-Api-Key: {}' -H 'X-Api-Secret: {}'",
        creds.api_key, creds.api_secret
    );
    let get_auth = format!(
        " {tls_args}-H 'X-Api-Key: {}' -H 'X-Api-Secret: {}'",
        creds.api_key, creds.api_secret
    );
    let operator_auth = format!(
        " {tls_args}-H 'X-Api-Key: {}' -H 'X-Api-Secret: {}'",
        creds.operator_api_key, creds.operator_api_secret
    );
    let banner = format!(
        r#"
==> Keyward is running in DEV MODE on {base}

    DEV MODE ONLY: the master key is kept in plain text in {data_dir}/master.key,
    the database in {data_dir}/keyward.db, and the dev credentials in
    {data_dir}/dev-credentials.json. {transport}.
    Never use dev mode for real data: use `keyward serve`.

    Tenant:        {tenant}
    API key:       {api_key}
    API secret:    {api_secret}
    Encryption:    {enc}
    Operator key:  {operator_key} (tenants, API keys, root KEK, every tenant's audit;
                   no encrypt or decrypt)

Encrypt:
  curl -sS {base}/v1/encrypt {auth} \
    -d '{{"encryptionId":"{enc}","data":"hello, keyward"}}'

Decrypt (this ciphertext was made at start):
  curl -sS {base}/v1/decrypt {auth} \
    -d '{{"encryptionId":"{enc}","cipherText":"{ct}","encryptionVersionId":"{ver}","metadata":{{"nonce":"{nonce}"}}}}'

Rotate:
  curl -sS {base}/v1/rotate {auth} \
    -d '{{"encryptionId":"{enc}"}}'

Inspect:
  curl -sS {base}/v1/encryptions/{enc}{get_auth}

Tenants (operator key):
  curl -sS {base}/v1/tenants{operator_auth}
"#,
        operator_key = creds.operator_api_key,
        data_dir = data_dir.display(),
        api_key = creds.api_key,
        api_secret = creds.api_secret,
        ct = b64.encode(&sample.ciphertext),
        ver = sample.version_id,
        nonce = b64.encode(sample.nonce.unwrap_or_default()),
    );
    let mut out = std::io::stdout().lock();
    out.write_all(banner.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// How often a running dev server checks its certificates' expiry.
const DEV_CERT_CHECK: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// Renews the dev certificates of a long-running dev server when they near
/// expiry, and serves the new ones without a restart.
async fn renew_dev_certificates(dir: PathBuf, tls: std::sync::Arc<crate::tls::ReloadableTls>) {
    loop {
        tokio::time::sleep(DEV_CERT_CHECK).await;
        let before = std::fs::read(dir.join("server.pem")).ok();
        match certs::ensure(&dir) {
            Ok(certs) if std::fs::read(&certs.server_cert).ok() != before => match tls.reload() {
                Ok(()) => tracing::info!("dev certificates renewed and reloaded"),
                Err(e) => tracing::warn!(error = %e, "renewed dev certificates do not load"),
            },
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot renew the dev certificates")
            }
        }
    }
}
