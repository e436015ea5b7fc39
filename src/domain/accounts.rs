//! Tenants and API keys: creating and revoking them. These touch no key
//! material, so the CLI runs them with only a database URL.

use super::apikeys::{issue_credential, IssuedCredential, Scopes};
use super::time::now_ms;
use super::TenantId;
use crate::store::{ApiKeyRow, Store, StoreError, TenantRow};

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// No such tenant.
    #[error("tenant {0} not found")]
    TenantNotFound(TenantId),
    /// A tenant with this name exists.
    #[error("a tenant named `{0}` already exists")]
    TenantExists(String),
    /// The name is empty, too long, or has control characters.
    #[error("a tenant name must be 1 to 100 printable characters")]
    InvalidName,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A new tenant with its first (all-scopes) credential.
#[derive(Debug)]
pub struct NewTenant {
    /// The tenant.
    pub tenant: TenantRow,
    /// Its credential: the secret is shown once and never stored.
    pub credential: IssuedCredential,
}

/// Creates a tenant and an all-scopes API key for it.
pub async fn create_tenant(store: &Store, name: &str) -> Result<NewTenant, AccountError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(AccountError::InvalidName);
    }
    let tenant = TenantRow {
        id: TenantId::new_random(),
        name: name.to_string(),
        created_at: now_ms(),
    };
    match store.insert_tenant(&tenant).await {
        Err(StoreError::Conflict(_)) => return Err(AccountError::TenantExists(name.to_string())),
        other => other?,
    }
    let credential = create_api_key(store, tenant.id, Scopes::all(), None).await?;
    Ok(NewTenant { tenant, credential })
}

/// Issues an API key for a tenant, optionally bound to a client certificate's
/// public key (SHA-256 of its SubjectPublicKeyInfo).
pub async fn create_api_key(
    store: &Store,
    tenant: TenantId,
    scopes: Scopes,
    cert_spki_sha256: Option<[u8; 32]>,
) -> Result<IssuedCredential, AccountError> {
    if store.tenant(tenant).await?.is_none() {
        return Err(AccountError::TenantNotFound(tenant));
    }
    let credential = issue_credential();
    store
        .insert_api_key(&ApiKeyRow {
            id: credential.key_id.clone(),
            tenant_id: tenant,
            secret_sha256: credential.secret_sha256.to_vec(),
            scopes: scopes.to_string(),
            cert_spki_sha256: cert_spki_sha256.map(|d| d.to_vec()),
            created_at: now_ms(),
            revoked_at: None,
        })
        .await?;
    Ok(credential)
}

/// Revokes an API key; every running Keyward drops it from its cache within one
/// `sync_interval`. `false` if there was no live key with this id.
pub async fn revoke_api_key(store: &Store, key_id: &str) -> Result<bool, AccountError> {
    Ok(store.revoke_api_key(key_id, now_ms()).await?)
}
