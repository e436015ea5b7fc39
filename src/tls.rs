//! Transport security: rustls server configuration (TLS 1.3 only, mutual TLS
//! against a configured CA, optional CRLs), reloading it on SIGHUP, and the
//! client identity taken from the peer certificate.
//!
//! Identity follows MinIO KES: a client is known by the SHA-256 of its
//! certificate's SubjectPublicKeyInfo, so a renewed certificate for the same key
//! keeps its identity and a new key is a new identity.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::crypto::sha256;
use crate::domain::identity::ClientIdentity;

/// The PEM files that make up the TLS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain (leaf first).
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to; enables mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// CRLs for client certificates.
    pub client_crl: Option<PathBuf>,
}

/// Why a TLS configuration could not be built. Names the file and the setting.
#[derive(Debug, thiserror::Error)]
#[error("{setting} ({path}): {reason}")]
pub struct TlsError {
    /// The setting whose file is wrong.
    pub setting: &'static str,
    /// The file.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

fn err(setting: &'static str, path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError {
        setting,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The crypto provider: AWS-LC with the three TLS 1.3 suites, strongest first.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(provider)
}

/// Reads every certificate in a PEM file.
pub fn read_certs(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(setting, path, format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(setting, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(err(setting, path, "contains no certificate"));
    }
    Ok(certs)
}

/// Builds the server configuration from the files.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let chain = read_certs("KEYWARD_TLS_CERT", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        err(
            "KEYWARD_TLS_KEY",
            &files.key,
            format!("no usable private key: {e}"),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err("KEYWARD_TLS_CERT", &files.cert, e))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs("KEYWARD_TLS_CLIENT_CA", ca_path)? {
                roots.add(ca).map_err(|e| {
                    err(
                        "KEYWARD_TLS_CLIENT_CA",
                        ca_path,
                        format!("unusable CA certificate: {e}"),
                    )
                })?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if let Some(crl_path) = &files.client_crl {
                let crls = CertificateRevocationListDer::pem_file_iter(crl_path)
                    .map_err(|e| {
                        err(
                            "KEYWARD_TLS_CLIENT_CRL",
                            crl_path,
                            format!("cannot read: {e}"),
                        )
                    })?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        err(
                            "KEYWARD_TLS_CLIENT_CRL",
                            crl_path,
                            format!("not a PEM CRL file: {e}"),
                        )
                    })?;
                if crls.is_empty() {
                    return Err(err("KEYWARD_TLS_CLIENT_CRL", crl_path, "contains no CRL"));
                }
                // A CRL past its nextUpdate is refused, not trusted forever.
                verifier = verifier.with_crls(crls).enforce_revocation_expiration();
            }
            let verifier = verifier
                .build()
                .map_err(|e| err("KEYWARD_TLS_CLIENT_CA", ca_path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        err(
            "KEYWARD_TLS_KEY",
            &files.key,
            format!("does not match the certificate: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The server configuration, swapped atomically on reload: new connections use
/// the new one, established connections keep theirs.
pub struct ReloadableTls {
    files: TlsFiles,
    current: ArcSwap<ServerConfig>,
}

impl ReloadableTls {
    /// Loads the files; an error names the bad file.
    pub fn load(files: TlsFiles) -> Result<ReloadableTls, TlsError> {
        let config = server_config(&files)?;
        Ok(ReloadableTls {
            files,
            current: ArcSwap::new(config),
        })
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Whether client certificates are required.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reads the files again. On error the previous configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        self.current.store(config);
        Ok(())
    }
}

/// The identity in a DER client certificate; `None` if it does not parse.
pub fn client_identity(der: &[u8]) -> Option<ClientIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(ClientIdentity {
        subject: cert.subject().to_string(),
        spki_sha256: sha256(cert.public_key().raw),
    })
}

/// The SPKI digest of the first certificate in a PEM file (for
/// `apikey create --bind-cert`).
pub fn spki_sha256_of_pem(path: &Path) -> Result<[u8; 32], TlsError> {
    let certs = read_certs("--bind-cert", path)?;
    client_identity(&certs[0])
        .map(|id| id.spki_sha256)
        .ok_or_else(|| err("--bind-cert", path, "the certificate does not parse"))
}
