//! The `vault` provider: the root KEK is encrypted by a Vault or OpenBao transit
//! key. Authentication is a token (`KEYWARD_VAULT_TOKEN`) or AppRole
//! (`KEYWARD_VAULT_ROLE_ID` + `KEYWARD_VAULT_SECRET_ID`); a renewable token is
//! renewed before it expires, and an AppRole token is replaced by a new login.
//! The KEK id is bound by encrypting it together with the KEK and checking it on
//! the way back, so a wrapped KEK copied onto another row fails to unwrap.

use std::time::{Duration, Instant};

use base64::Engine;
use tokio::sync::Mutex;
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use zeroize::Zeroizing;

use super::provider::{MasterKeyProvider, ProviderError, ProviderFuture};
use crate::crypto::{DataKey, KEY_LEN};
use crate::domain::ids::KekId;
use crate::secret_cell::SecretCell;

const PREFIX: &[u8; 16] = b"keyward:kek:v1\0\0";

/// How to log in. The token and the secret id are cells: a `file://`
/// reference re-read on SIGHUP replaces them, and the next call logs in with
/// the new value.
#[derive(Clone)]
pub enum VaultAuth {
    /// A token, renewed when renewable.
    Token(SecretCell),
    /// AppRole credentials.
    AppRole {
        /// The auth mount (usually `approle`).
        mount: String,
        /// The role id.
        role_id: String,
        /// The secret id.
        secret_id: SecretCell,
    },
}

/// Settings of the Vault provider.
pub struct VaultSettings {
    /// `https://vault:8200`.
    pub addr: String,
    /// How to log in.
    pub auth: VaultAuth,
    /// The transit mount (default `transit`).
    pub mount: String,
    /// The transit key's name.
    pub key: String,
    /// A CA bundle for Vault's TLS certificate.
    pub ca_file: Option<String>,
}

struct Session {
    client: VaultClient,
    /// When the token must be renewed or replaced (None: never expires).
    refresh_at: Option<Instant>,
    /// The generation of the configured secret this session was made with:
    /// a newer one (re-read on SIGHUP) means log in again with it.
    secret_generation: u64,
}

/// A transit key in Vault or OpenBao.
pub struct Vault {
    settings: VaultSettings,
    session: Mutex<Option<Session>>,
}

fn unavailable(what: &str, e: ClientError) -> ProviderError {
    ProviderError::Unavailable(format!("Vault {what} failed: {}", describe(&e)))
}

fn describe(e: &ClientError) -> String {
    match e {
        ClientError::APIError { code, errors } => format!("HTTP {code}: {}", errors.join("; ")),
        ClientError::RestClientError { source } => format!(
            "{source}: {}",
            std::error::Error::source(source)
                .map(|s| s.to_string())
                .unwrap_or_default()
        ),
        other => other.to_string(),
    }
}

impl Vault {
    /// A provider; nothing is contacted until the first call.
    pub fn new(settings: VaultSettings) -> Vault {
        Vault {
            settings,
            session: Mutex::new(None),
        }
    }

    /// A logged-in client, logging in or renewing as needed.
    async fn client(
        &self,
    ) -> Result<tokio::sync::MappedMutexGuard<'_, VaultClient>, ProviderError> {
        let mut guard = self.session.lock().await;
        let generation = self.secret_generation();
        let stale = match &*guard {
            None => true,
            Some(s) => {
                s.refresh_at.is_some_and(|at| Instant::now() >= at)
                    || s.secret_generation != generation
            }
        };
        if stale {
            match self.refresh().await {
                Ok(session) => *guard = Some(session),
                // Keep a session whose token may still be valid and try again
                // shortly; without one there is nothing to fall back on.
                Err(e) => match guard.as_mut() {
                    Some(s) => {
                        tracing::warn!(error = %e, "could not renew the Vault credentials; retrying in 5 s");
                        s.refresh_at = Some(Instant::now() + Duration::from_secs(5));
                    }
                    None => return Err(e),
                },
            }
        }
        // Set above, or returned early.
        tokio::sync::MutexGuard::try_map(guard, |s| s.as_mut().map(|s| &mut s.client))
            .map_err(|_| ProviderError::Unavailable("no Vault session".to_string()))
    }

    fn secret_generation(&self) -> u64 {
        match &self.settings.auth {
            VaultAuth::Token(token) => token.generation(),
            VaultAuth::AppRole { secret_id, .. } => secret_id.generation(),
        }
    }

    /// One field of a KV version 2 secret (`vault://MOUNT/PATH#FIELD` secret
    /// references), read with this provider's address, CA and login. The
    /// error names the reference's parts, never a value.
    pub async fn read_kv2_field(
        &self,
        mount: &str,
        path: &str,
        field: &str,
    ) -> Result<Zeroizing<String>, String> {
        let client = self.client().await.map_err(|e| e.to_string())?;
        let mut data: serde_json::Map<String, serde_json::Value> =
            match vaultrs::kv2::read(&*client, mount, path).await {
                Ok(data) => data,
                Err(ClientError::APIError { code: 404, .. }) => {
                    return Err(format!(
                        "no KV v2 secret `{path}` in mount `{mount}` (or no such mount)"
                    ))
                }
                Err(e) => return Err(format!("Vault KV read failed: {}", describe(&e))),
            };
        match data.remove(field) {
            Some(serde_json::Value::String(value)) => Ok(Zeroizing::new(value)),
            Some(_) => Err(format!("the field `{field}` is not a string")),
            None => Err(format!("the secret has no field `{field}`")),
        }
    }

    fn new_client(&self, token: &str) -> Result<VaultClient, ProviderError> {
        let mut builder = VaultClientSettingsBuilder::default();
        builder
            .address(&self.settings.addr)
            .token(token)
            .timeout(Some(Duration::from_secs(10)))
            // Set explicitly: vaultrs's defaults come from the environment
            // (VAULT_SKIP_VERIFY turns verification off, VAULT_CACERT and
            // VAULT_CAPATH add CAs), which an image or CI could set
            // unnoticed. Only KEYWARD_VAULT_CA_FILE adds a CA.
            .verify(true)
            .ca_certs(self.settings.ca_file.iter().cloned().collect());
        let settings = builder
            .build()
            .map_err(|e| ProviderError::Unavailable(format!("Vault settings: {e}")))?;
        VaultClient::new(settings).map_err(|e| unavailable("client setup", e))
    }

    /// Logs in (AppRole), or renews the token (token auth), and says when to
    /// do it again: at two thirds of the lease.
    async fn refresh(&self) -> Result<Session, ProviderError> {
        let refresh_after =
            |lease: u64| (lease > 0).then(|| Instant::now() + Duration::from_secs(lease * 2 / 3));
        match &self.settings.auth {
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let generation = secret_id.generation();
                let secret_id = secret_id.get();
                let client = self.new_client("")?;
                let auth = vaultrs::auth::approle::login(&client, mount, role_id, &secret_id)
                    .await
                    .map_err(|e| unavailable("AppRole login", e))?;
                let mut client = self.new_client(&auth.client_token)?;
                client.set_token(&auth.client_token);
                tracing::info!(
                    lease_s = auth.lease_duration,
                    "logged in to Vault with AppRole"
                );
                Ok(Session {
                    client,
                    refresh_at: refresh_after(auth.lease_duration),
                    secret_generation: generation,
                })
            }
            VaultAuth::Token(token) => {
                let generation = token.generation();
                let client = self.new_client(&token.get())?;
                let info = vaultrs::token::lookup_self(&client)
                    .await
                    .map_err(|e| unavailable("token lookup", e))?;
                if info.renewable.unwrap_or(false) {
                    match vaultrs::token::renew_self(&client, None).await {
                        Ok(auth) => {
                            tracing::debug!(
                                lease_s = auth.lease_duration,
                                "renewed the Vault token"
                            );
                            return Ok(Session {
                                client,
                                refresh_at: refresh_after(auth.lease_duration),
                                secret_generation: generation,
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %describe(&e), "could not renew the Vault token")
                        }
                    }
                }
                Ok(Session {
                    client,
                    refresh_at: refresh_after(info.ttl),
                    secret_generation: generation,
                })
            }
        }
    }
}

impl MasterKeyProvider for Vault {
    fn name(&self) -> &'static str {
        "vault"
    }

    fn key_setting(&self) -> &'static str {
        "KEYWARD_VAULT_TRANSIT_KEY"
    }

    /// Renews the token (or logs in again with AppRole) at two thirds of its
    /// lease, so that the provider still works when it is next needed (a
    /// root-KEK rotation, a replica's reload), long after start.
    fn keep_alive(&self) -> ProviderFuture<'_, ()> {
        Box::pin(async move {
            loop {
                let due = self
                    .session
                    .lock()
                    .await
                    .as_ref()
                    .and_then(|s| s.refresh_at);
                match due {
                    Some(at) if Instant::now() >= at => {
                        if let Err(e) = self.client().await {
                            tracing::warn!(error = %e, "could not renew the Vault credentials; retrying");
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                    }
                    Some(at) => {
                        let wait = at.saturating_duration_since(Instant::now());
                        tokio::time::sleep(wait.min(Duration::from_secs(60))).await
                    }
                    None => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        })
    }

    fn wrap_root_kek<'a>(&'a self, kek_id: KekId, kek: &'a DataKey) -> ProviderFuture<'a, Vec<u8>> {
        Box::pin(async move {
            let mut plain = Zeroizing::new(Vec::with_capacity(64));
            plain.extend_from_slice(PREFIX);
            plain.extend_from_slice(kek_id.as_bytes());
            plain.extend_from_slice(kek.expose());
            let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*plain));
            let client = self.client().await?;
            let out = vaultrs::transit::data::encrypt(
                &*client,
                &self.settings.mount,
                &self.settings.key,
                &b64,
                None,
            )
            .await
            .map_err(|e| unavailable("transit encrypt", e))?;
            Ok(out.ciphertext.into_bytes())
        })
    }

    fn unwrap_root_kek<'a>(
        &'a self,
        kek_id: KekId,
        wrapped: &'a [u8],
    ) -> ProviderFuture<'a, DataKey> {
        Box::pin(async move {
            let ciphertext =
                std::str::from_utf8(wrapped).map_err(|_| ProviderError::KeyMismatch)?;
            let client = self.client().await?;
            let mut out = match vaultrs::transit::data::decrypt(
                &*client,
                &self.settings.mount,
                &self.settings.key,
                ciphertext,
                None,
            )
            .await
            {
                Ok(out) => out,
                // Transit answers 400 both when the key cannot decrypt this
                // ciphertext (a mismatch) and for configuration errors such as
                // a missing key (worth reporting, not a mismatch).
                Err(ClientError::APIError { code: 400, errors })
                    if errors.iter().any(|e| {
                        e.contains("message authentication failed")
                            || e.contains("invalid ciphertext")
                            || e.contains("invalid key version")
                    }) =>
                {
                    return Err(ProviderError::KeyMismatch)
                }
                Err(e) => return Err(unavailable("transit decrypt", e)),
            };
            kek_from_transit(kek_id, std::mem::take(&mut out.plaintext))
        })
    }
}

/// The root KEK from transit's answer (base64 of the prefix, the KEK id and
/// the KEK). The answer's string is the one copy of the KEK that is ours (the
/// HTTP body it was parsed from is vaultrs's): taken by value into zeroizing
/// memory before anything can fail, and its decoding likewise.
fn kek_from_transit(kek_id: KekId, plaintext: String) -> Result<DataKey, ProviderError> {
    let b64 = Zeroizing::new(plaintext);
    let plain = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|_| ProviderError::KeyMismatch)?,
    );
    if plain.len() != 32 + KEY_LEN || &plain[..16] != PREFIX || &plain[16..32] != kek_id.as_bytes()
    {
        return Err(ProviderError::KeyMismatch);
    }
    DataKey::from_slice(&plain[32..]).ok_or(ProviderError::KeyMismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transit's answer is read into a KEK only when it carries this KEK's
    /// id; the answer string is taken by value (the type says so: a borrow
    /// would leave the caller's copy uncleared).
    #[test]
    fn the_transit_answer_is_taken_whole_and_checked_against_the_kek_id() {
        let read: fn(KekId, String) -> Result<DataKey, ProviderError> = kek_from_transit;
        let (id, other) = (KekId::new_random(), KekId::new_random());
        let kek = DataKey::generate();
        let answer = |id: &KekId| {
            let mut plain = PREFIX.to_vec();
            plain.extend_from_slice(id.as_bytes());
            plain.extend_from_slice(kek.expose());
            base64::engine::general_purpose::STANDARD.encode(plain)
        };
        assert_eq!(read(id, answer(&id)).unwrap().expose(), kek.expose());
        assert!(matches!(
            read(id, answer(&other)),
            Err(ProviderError::KeyMismatch)
        ));
        assert!(matches!(
            read(id, "not base64!".into()),
            Err(ProviderError::KeyMismatch)
        ));
        assert!(matches!(
            read(id, String::new()),
            Err(ProviderError::KeyMismatch)
        ));
    }
}
