//! The `azure-key-vault` provider: the root KEK (with a prefix and its KEK id,
//! which are checked on the way back, as the `vault` provider does) is
//! wrapped by a Key Vault key's `wrapkey` operation, RSA-OAEP-256 by default
//! or A256KW for a Managed HSM's AES key, through Azure's official crates
//! (`azure_security_keyvault_keys`, `azure_identity`). The key version that
//! wrapped it (the `kid` Key Vault answers) is stored with the wrapped KEK, so
//! a rotated Key Vault key still unwraps the KEKs its older versions wrapped.
//!
//! Credentials: a service principal's client secret, a managed identity, or
//! workload identity (the federated token file Azure's Kubernetes webhook
//! mounts). The crates' HTTP goes through Keyward's own reqwest client
//! (rustls on AWS-LC, the system's roots plus an optional CA file), not
//! through their default TLS stack.

use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::{Secret, TokenCredential};
use azure_core::error::ErrorKind;
use azure_core::http::{ClientOptions, RequestContent, RetryOptions, Transport};
use azure_identity::{
    ClientSecretCredential, ClientSecretCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use azure_security_keyvault_keys::models::{
    EncryptionAlgorithm, KeyClientWrapKeyOptions, KeyOperationParameters,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use zeroize::Zeroizing;

use super::provider::{MasterKeyProvider, ProviderError, ProviderFuture};
use crate::crypto::{DataKey, KEY_LEN};
use crate::domain::ids::KekId;

const PREFIX: &[u8; 16] = b"keyward:kek:v1\0\0";
const MAGIC: &[u8; 8] = b"kwazkv\0\x01";

/// How Keyward gets an Azure AD (Entra ID) token.
pub enum AzureCredential {
    /// A service principal's client secret.
    ClientSecret {
        /// The directory (tenant) id.
        tenant_id: String,
        /// The application (client) id.
        client_id: String,
        /// The secret (the secret-reference resolver applies to this setting).
        secret: Zeroizing<String>,
    },
    /// The VM's, App Service's or pod's managed identity (optionally a
    /// user-assigned one, by client id).
    ManagedIdentity {
        /// A user-assigned identity's client id.
        client_id: Option<String>,
    },
    /// Workload identity: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and
    /// `AZURE_FEDERATED_TOKEN_FILE`, as Azure's Kubernetes webhook sets them.
    WorkloadIdentity,
}

/// Settings of the Azure Key Vault provider.
pub struct AzureSettings {
    /// `https://NAME.vault.azure.net` or a Managed HSM's
    /// `https://NAME.managedhsm.azure.net`.
    pub vault_url: String,
    /// The key's name.
    pub key: String,
    /// `RSA-OAEP-256` (an RSA key) or `A256KW` (a Managed HSM AES key).
    pub algorithm: AzureAlgorithm,
    /// How to log in.
    pub credential: AzureCredential,
    /// A PEM CA bundle trusted besides the system's roots (a private
    /// endpoint's own CA).
    pub ca_file: Option<String>,
    /// Check that the vault's authentication challenge names the vault's
    /// own domain (the SDK's safeguard; off only for a vault reached under
    /// another name).
    pub verify_challenge_resource: bool,
}

/// The key-wrapping algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AzureAlgorithm {
    /// RSA-OAEP with SHA-256 and MGF1-SHA-256.
    RsaOaep256,
    /// AES key wrap (RFC 3394) with a 256-bit key, Managed HSM only.
    A256Kw,
}

impl AzureAlgorithm {
    /// Parses `RSA-OAEP-256` or `A256KW`.
    pub fn parse(v: &str) -> Option<AzureAlgorithm> {
        match v {
            "RSA-OAEP-256" => Some(AzureAlgorithm::RsaOaep256),
            "A256KW" => Some(AzureAlgorithm::A256Kw),
            _ => None,
        }
    }

    fn sdk(self) -> EncryptionAlgorithm {
        match self {
            AzureAlgorithm::RsaOaep256 => EncryptionAlgorithm::RsaOaep256,
            AzureAlgorithm::A256Kw => EncryptionAlgorithm::A256Kw,
        }
    }
}

/// A key in Azure Key Vault or a Managed HSM.
pub struct AzureKeyVault {
    client: Result<KeyClient, String>,
    key: String,
    algorithm: AzureAlgorithm,
}

fn http_client(ca_file: Option<&str>) -> Result<reqwest_013::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("KEYWARD_AZURE_KEY_VAULT_CA_FILE {path}: {e}"))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("KEYWARD_AZURE_KEY_VAULT_CA_FILE {path}: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest_013::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| e.to_string())
}

/// The crates' options: Keyward's HTTP client, and no retries of the SDK's
/// own. Keyward retries a provider that is down itself (with backoff,
/// serving meanwhile), and the SDK's retries are unsafe on a client's first
/// call: its Key Vault authorizer takes the body off a request sent before
/// the challenge has told it the scope, so a retry of that request after a
/// network error reaches the vault with no body (seen against the fake:
/// 400 on `unwrapkey`, which would read as a key mismatch).
fn client_options(http: &reqwest_013::Client) -> ClientOptions {
    ClientOptions {
        transport: Some(Transport::new(Arc::new(http.clone()))),
        retry: RetryOptions::none(),
        ..Default::default()
    }
}

fn credential(
    settings: &AzureCredential,
    http: &reqwest_013::Client,
) -> azure_core::Result<Arc<dyn TokenCredential>> {
    Ok(match settings {
        AzureCredential::ClientSecret {
            tenant_id,
            client_id,
            secret,
        } => ClientSecretCredential::new(
            tenant_id,
            client_id.clone(),
            Secret::new(secret.to_string()),
            Some(ClientSecretCredentialOptions {
                client_options: client_options(http),
            }),
        )?,
        AzureCredential::ManagedIdentity { client_id } => {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: client_id
                    .clone()
                    .map(azure_identity::UserAssignedId::ClientId),
                client_options: client_options(http),
            }))?
        }
        AzureCredential::WorkloadIdentity => {
            let mut options = WorkloadIdentityCredentialOptions::default();
            options.credential_options.client_options = client_options(http);
            WorkloadIdentityCredential::new(Some(options))?
        }
    })
}

impl AzureKeyVault {
    /// Builds the client; nothing is contacted until the first call. A
    /// setting the SDK refuses is reported at that call, as a configuration
    /// error.
    pub fn new(settings: AzureSettings) -> AzureKeyVault {
        let client = http_client(settings.ca_file.as_deref()).and_then(|http| {
            let credential = credential(&settings.credential, &http).map_err(|e| describe(&e))?;
            KeyClient::new(
                &settings.vault_url,
                credential,
                Some(KeyClientOptions {
                    client_options: client_options(&http),
                    verify_challenge_resource: Some(settings.verify_challenge_resource),
                    ..Default::default()
                }),
            )
            .map_err(|e| describe(&e))
        });
        AzureKeyVault {
            client,
            key: settings.key,
            algorithm: settings.algorithm,
        }
    }

    fn client(&self) -> Result<&KeyClient, ProviderError> {
        self.client
            .as_ref()
            .map_err(|e| ProviderError::Misconfigured(format!("Azure Key Vault client: {e}")))
    }
}

/// The error's message and its causes, one line.
fn describe(e: &azure_core::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Whether a failure is the network's (worth retrying) rather than Azure's
/// answer to this configuration.
fn is_transport(e: &azure_core::Error) -> bool {
    if matches!(e.kind(), ErrorKind::Connection | ErrorKind::Io) {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(inner) = s.downcast_ref::<azure_core::Error>() {
            if matches!(inner.kind(), ErrorKind::Connection | ErrorKind::Io) {
                return true;
            }
        }
        if let Some(r) = s.downcast_ref::<reqwest_013::Error>() {
            if r.is_connect() || r.is_timeout() || r.is_request() {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// Sorts a failure: unreachable (network, Azure's 5xx, throttling) is an
/// outage; Azure refusing the credentials, the permissions or the key is a
/// configuration error; a wrapped KEK the key cannot unwrap is a mismatch.
fn classify(what: &str, e: azure_core::Error, unwrapping: bool) -> ProviderError {
    let code = match e.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => format!(
            " (HTTP {}{})",
            u16::from(*status),
            error_code
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default()
        ),
        _ => String::new(),
    };
    let text = format!("Azure Key Vault {what}{code}: {}", describe(&e));
    if is_transport(&e) {
        return ProviderError::Unavailable(text);
    }
    match e.kind() {
        ErrorKind::HttpResponse { status, .. } => match u16::from(*status) {
            400 if unwrapping => ProviderError::KeyMismatch,
            401 | 403 | 404 | 400 => ProviderError::Misconfigured(text),
            _ => ProviderError::Unavailable(text),
        },
        ErrorKind::Credential => ProviderError::Misconfigured(text),
        _ => ProviderError::Unavailable(text),
    }
}

/// `MAGIC || u16 BE length || kid || the key's wrapping of PREFIX || KEK id || KEK`.
fn encode(kid: &str, wrapped: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + kid.len() + wrapped.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(kid.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(kid.as_bytes());
    out.extend_from_slice(wrapped);
    out
}

fn decode(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let (len, rest) = rest.split_first_chunk::<2>()?;
    let len = u16::from_be_bytes(*len) as usize;
    let kid = std::str::from_utf8(rest.get(..len)?).ok()?;
    Some((kid, rest.get(len..)?))
}

/// The version in a key id `https://VAULT/keys/NAME/VERSION`.
fn kid_version(kid: &str) -> Option<&str> {
    let mut parts = kid.trim_end_matches('/').rsplit('/');
    let version = parts.next()?;
    let _name = parts.next()?;
    (parts.next()? == "keys" && !version.is_empty()).then_some(version)
}

impl MasterKeyProvider for AzureKeyVault {
    fn name(&self) -> &'static str {
        "azure-key-vault"
    }

    fn key_setting(&self) -> &'static str {
        "KEYWARD_AZURE_KEY_VAULT_KEY"
    }

    fn wrap_root_kek<'a>(&'a self, kek_id: KekId, kek: &'a DataKey) -> ProviderFuture<'a, Vec<u8>> {
        Box::pin(async move {
            let client = self.client()?;
            let mut plain = Zeroizing::new(Vec::with_capacity(32 + KEY_LEN));
            plain.extend_from_slice(PREFIX);
            plain.extend_from_slice(kek_id.as_bytes());
            plain.extend_from_slice(kek.expose());
            // The SDK serializes the request from its own copy, which it
            // does not clear: the one copy of the KEK outside zeroizing
            // memory, for the length of the call (as with the AWS SDK).
            let parameters = KeyOperationParameters {
                algorithm: Some(self.algorithm.sdk()),
                value: Some(plain.to_vec()),
                ..Default::default()
            };
            let body = RequestContent::try_from(parameters)
                .map_err(|e| ProviderError::Unavailable(describe(&e)))?;
            let result = client
                .wrap_key(&self.key, body, None::<KeyClientWrapKeyOptions>)
                .await
                .map_err(|e| classify("wrapkey", e, false))?
                .into_model()
                .map_err(|e| classify("wrapkey answer", e, false))?;
            let kid = result.kid.ok_or_else(|| {
                ProviderError::Unavailable("Azure Key Vault wrapkey: no kid in the answer".into())
            })?;
            let wrapped = result.result.ok_or_else(|| {
                ProviderError::Unavailable(
                    "Azure Key Vault wrapkey: no result in the answer".into(),
                )
            })?;
            kid_version(&kid).ok_or_else(|| {
                ProviderError::Unavailable(format!(
                    "Azure Key Vault wrapkey: `{kid}` is not a key id with a version"
                ))
            })?;
            Ok(encode(&kid, &wrapped))
        })
    }

    fn unwrap_root_kek<'a>(
        &'a self,
        kek_id: KekId,
        wrapped: &'a [u8],
    ) -> ProviderFuture<'a, DataKey> {
        Box::pin(async move {
            let (kid, ciphertext) = decode(wrapped).ok_or(ProviderError::KeyMismatch)?;
            let version = kid_version(kid).ok_or(ProviderError::KeyMismatch)?;
            let client = self.client()?;
            let parameters = KeyOperationParameters {
                algorithm: Some(self.algorithm.sdk()),
                value: Some(ciphertext.to_vec()),
                ..Default::default()
            };
            let body = RequestContent::try_from(parameters)
                .map_err(|e| ProviderError::Unavailable(describe(&e)))?;
            let result = client
                .unwrap_key(&self.key, version, body, None)
                .await
                .map_err(|e| classify("unwrapkey", e, true))?
                .into_model()
                .map_err(|e| classify("unwrapkey answer", e, true))?;
            let plain = Zeroizing::new(result.result.unwrap_or_default());
            if plain.len() != 32 + KEY_LEN
                || &plain[..16] != PREFIX
                || &plain[16..32] != kek_id.as_bytes()
            {
                return Err(ProviderError::KeyMismatch);
            }
            DataKey::from_slice(&plain[32..]).ok_or(ProviderError::KeyMismatch)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_form_keeps_the_key_version_and_refuses_what_is_not_it() {
        let kid = "https://kw.vault.azure.net/keys/root/0123abcd";
        let bytes = encode(kid, &[7; 256]);
        let (back, wrapped) = decode(&bytes).unwrap();
        assert_eq!((back, wrapped), (kid, &[7u8; 256][..]));
        assert_eq!(kid_version(back), Some("0123abcd"));
        assert_eq!(kid_version("https://kw.vault.azure.net/keys/root"), None);
        assert!(decode(b"kwazkv\0\x02....").is_none());
        assert!(decode(&bytes[..12]).is_none());
        assert_eq!(
            AzureAlgorithm::parse("A256KW"),
            Some(AzureAlgorithm::A256Kw)
        );
        assert_eq!(AzureAlgorithm::parse("RSA1_5"), None);
    }
}
