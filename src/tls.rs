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

/// Where the server certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCert {
    /// PEM files, read at start and on SIGHUP.
    Files {
        /// Server certificate chain (leaf first).
        cert: PathBuf,
        /// Server private key.
        key: PathBuf,
    },
    /// Obtained and renewed by Keyward itself (ACME): a [`ManagedCert`].
    Managed,
}

/// The TLS configuration: the server certificate and the client CA and CRL files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate.
    pub server: ServerCert,
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

/// A server certificate swapped in place by whoever obtains it (the ACME
/// renewal task): every new handshake gets the current one, connections
/// already established keep theirs. Until the first is set, handshakes fail.
#[derive(Debug, Default)]
pub struct ManagedCert {
    current: arc_swap::ArcSwapOption<rustls::sign::CertifiedKey>,
}

impl ManagedCert {
    /// Builds a certified key from a PEM chain (leaf first) and a PEM private key.
    pub fn certified_key(
        chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<rustls::sign::CertifiedKey, String> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
        if chain.is_empty() {
            return Err("no certificate in the chain".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| format!("no usable private key: {e}"))?;
        rustls::sign::CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| format!("the key does not match the certificate: {e}"))
    }

    /// Serves `key` from the next handshake on.
    pub fn set(&self, key: rustls::sign::CertifiedKey) {
        self.current.store(Some(Arc::new(key)));
    }

    /// Whether a certificate is set.
    pub fn is_set(&self) -> bool {
        self.current.load().is_some()
    }
}

impl rustls::server::ResolvesServerCert for ManagedCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current.load_full()
    }
}

/// The client CA Keyward holds itself (`keyward client-cert`), as the
/// mutual-TLS verifier uses it: trusted in addition to
/// `KEYWARD_TLS_CLIENT_CA`, with its CRL always enforced.
#[derive(Debug, Clone)]
pub struct KeywardClientCa {
    /// The CA certificate.
    pub cert: CertificateDer<'static>,
    /// Its current CRL.
    pub crl: CertificateRevocationListDer<'static>,
    /// The CRL's number (for the log).
    pub crl_number: i64,
}

/// Builds the server configuration from the files (and, for
/// [`ServerCert::Managed`], the managed certificate), trusting `keyward_ca`
/// for client certificates too when mutual TLS is on.
///
/// How the two CAs combine: a client certificate is accepted when it chains
/// to either. The Keyward CA's CRL is always checked for its certificates.
/// With `KEYWARD_TLS_CLIENT_CRL`, the file's CRLs are checked too and, as
/// without the Keyward CA, a certificate whose issuer has no CRL is refused;
/// without it, certificates of the configured CA are not checked for
/// revocation, as before.
pub fn server_config(
    files: &TlsFiles,
    managed: Option<&Arc<ManagedCert>>,
    keyward_ca: Option<&KeywardClientCa>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let cert_setting = match &files.server {
        ServerCert::Files { cert, .. } => cert.clone(),
        ServerCert::Managed => PathBuf::from("(ACME)"),
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err("KEYWARD_TLS_CERT", &cert_setting, e))?;
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
            if let Some(ca) = keyward_ca {
                roots.add(ca.cert.clone()).map_err(|e| {
                    err(
                        "KEYWARD_TLS_CLIENT_CA",
                        Path::new("(Keyward client CA)"),
                        format!("unusable CA certificate: {e}"),
                    )
                })?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let keyward_crl = keyward_ca.map(|ca| ca.crl.clone());
            if files.client_crl.is_none() {
                if let Some(crl) = keyward_crl.clone() {
                    // Certificates of the configured CA have no CRL here
                    // and are not checked, as without the Keyward CA; the
                    // Keyward CA's always are (its CRL is always present).
                    verifier = verifier
                        .with_crls([crl])
                        .allow_unknown_revocation_status()
                        .only_check_end_entity_revocation();
                }
            }
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
                let mut crls = crls;
                crls.extend(keyward_crl);
                // A CRL past its nextUpdate is refused, not trusted forever.
                verifier = verifier.with_crls(crls).enforce_revocation_expiration();
            }
            let verifier = verifier
                .build()
                .map_err(|e| err("KEYWARD_TLS_CLIENT_CA", ca_path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = match (&files.server, managed) {
        (ServerCert::Files { cert, key }, _) => {
            let chain = read_certs("KEYWARD_TLS_CERT", cert)?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                err(
                    "KEYWARD_TLS_KEY",
                    key,
                    format!("no usable private key: {e}"),
                )
            })?;
            builder.with_single_cert(chain, key_der).map_err(|e| {
                err(
                    "KEYWARD_TLS_KEY",
                    key,
                    format!("does not match the certificate: {e}"),
                )
            })?
        }
        (ServerCert::Managed, Some(managed)) => builder.with_cert_resolver(managed.clone()),
        (ServerCert::Managed, None) => {
            return Err(err(
                "KEYWARD_ACME_DIRECTORY",
                &cert_setting,
                "no managed certificate to serve",
            ))
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The server configuration, swapped atomically on reload: new connections use
/// the new one, established connections keep theirs.
pub struct ReloadableTls {
    files: TlsFiles,
    managed: Option<Arc<ManagedCert>>,
    /// The Keyward client CA as last read from the database.
    keyward_ca: arc_swap::ArcSwapOption<KeywardClientCa>,
    /// Held while a configuration is built and stored, so that a SIGHUP
    /// reload and a CRL change cannot store an older one last.
    rebuild: std::sync::Mutex<()>,
    current: ArcSwap<ServerConfig>,
}

impl ReloadableTls {
    /// Loads the files; an error names the bad file. `managed` serves the
    /// server certificate for [`ServerCert::Managed`].
    pub fn load(
        files: TlsFiles,
        managed: Option<Arc<ManagedCert>>,
    ) -> Result<ReloadableTls, TlsError> {
        let config = server_config(&files, managed.as_ref(), None)?;
        Ok(ReloadableTls {
            files,
            managed,
            keyward_ca: arc_swap::ArcSwapOption::empty(),
            rebuild: std::sync::Mutex::new(()),
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
        let _one = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let ca = self.keyward_ca.load_full();
        let config = server_config(&self.files, self.managed.as_ref(), ca.as_deref())?;
        self.current.store(config);
        Ok(())
    }

    /// Trusts the Keyward client CA with this CRL from the next handshake
    /// on (nothing changes without mutual TLS). On error the previous
    /// configuration stays.
    pub fn set_keyward_ca(&self, ca: Option<KeywardClientCa>) -> Result<(), TlsError> {
        let _one = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let ca = ca.map(Arc::new);
        let config = server_config(&self.files, self.managed.as_ref(), ca.as_deref())?;
        self.keyward_ca.store(ca);
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
