//! A small client of a running Keyward's API, for the CLI's `job` commands.
//! Credentials come from flags or `KEYWARD_URL`, `KEYWARD_API_KEY`,
//! `KEYWARD_API_SECRET`; mutual TLS from `--cacert`, `--cert`, `--key`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Where and as whom to call.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// Keyward's URL.
    #[arg(long, env = "KEYWARD_URL", default_value = "http://127.0.0.1:8480")]
    pub url: String,
    /// API key id (scope `manage`).
    #[arg(long, env = "KEYWARD_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// API key secret.
    #[arg(long, env = "KEYWARD_API_SECRET", hide_env_values = true)]
    pub api_secret: String,
    /// CA bundle to verify Keyward's certificate.
    #[arg(long, value_name = "PEM")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (mutual TLS).
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client key (mutual TLS).
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))
}

impl Remote {
    fn client(&self) -> anyhow::Result<reqwest::Client> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &self.cacert {
            for c in certs(ca)? {
                roots.add(c).context("unusable CA certificate")?;
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots);
        let tls = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder.with_client_auth_cert(
                certs(cert)?,
                PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("no private key in {}", key.display()))?,
            )?,
            _ => builder.with_no_client_auth(),
        };
        Ok(reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(60))
            .build()?)
    }

    /// Calls the API and decodes its JSON answer as `T`; an answer that does
    /// not decode is an error, never a default. A refusal becomes an error
    /// with Keyward's status, code and message.
    pub async fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut req = self
            .client()?
            .request(method.clone(), &url)
            .header("X-Api-Key", &self.api_key)
            .header("X-Api-Secret", &self.api_secret);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach Keyward at {}", self.url))?;
        let status = resp.status();
        if !status.is_success() {
            // Not every refusal comes from Keyward (a proxy's error page): one
            // that is not Keyward's error body is reported by its status alone.
            let (code, message) = match resp.json::<ErrorBody>().await {
                Ok(ErrorBody { error }) => (error.code, error.message),
                Err(_) => ("error".to_owned(), String::new()),
            };
            bail!("{} {code}: {message}", status.as_u16());
        }
        resp.json()
            .await
            .with_context(|| format!("Keyward's answer to {method} {path} is not the expected one"))
    }
}

/// For [`Remote::call`] without a request body.
pub const NO_BODY: Option<&()> = None;

/// Every error answer of the API: `{"error": {"code", "message"}}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

/// An error's stable code and human message.
#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}
