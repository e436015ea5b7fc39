//! Tenants and API keys: creating, listing, disabling and revoking them. These
//! touch no key material, so the CLI runs them with only a database URL; the
//! API runs them through [`KeyService`], which also drops what it revokes from
//! its own cache at once (other processes hear of it through the change feed).
//!
//! Two kinds of identity: a tenant key (`tenant_id` set) carries tenant scopes
//! and acts only inside its tenant; an operator key (no tenant) carries
//! operator scopes and never touches a tenant's keys or data. A key is made
//! with the scopes of its kind only ([`Scopes::check_kind`]).

use super::apikeys::{issue_credential, IssuedCredential, Principal, Scopes};
use super::service::KeyService;
use super::time::now_ms;
use super::TenantId;
use crate::store::{ApiKeyRow, Store, StoreError, TenantRow};

/// How many tenants or API keys one page of a listing holds at most.
pub const LIST_LIMIT: i64 = 1000;

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// No such tenant.
    #[error("tenant {0} not found")]
    TenantNotFound(TenantId),
    /// A tenant with this name exists.
    #[error("a tenant named `{0}` already exists")]
    TenantExists(String),
    /// The tenant is disabled: it gets no new API keys.
    #[error("tenant {0} is disabled")]
    TenantDisabled(TenantId),
    /// The name is empty, too long, or has control characters.
    #[error("a tenant name must be 1 to 100 printable characters")]
    InvalidName,
    /// The scopes are not those of the kind of key being made.
    #[error("{0}")]
    WrongKindOfScope(String),
    /// The caller asked for a scope it does not hold itself.
    #[error("an API key can only be given scopes its creator holds; missing: {0}")]
    ScopeNotHeld(Scopes),
    /// The caller is bound to a client certificate and asked for a key that
    /// is not bound to the same one.
    #[error("a key created by a certificate-bound key must be bound to the same certificate")]
    CertificateBindingRequired,
    /// No such live API key (or not one of this tenant's).
    #[error("API key not found")]
    ApiKeyNotFound,
    /// The tenant already holds as many live API keys as
    /// `max_api_keys_per_tenant` allows: revoke one first.
    #[error("the tenant already has {0} live API keys, the most allowed (`max_api_keys_per_tenant`); revoke one first")]
    ApiKeyLimitReached(i64),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AccountError {
    /// Whether the database could not be reached (a 503, not a 500).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AccountError::Store(StoreError::Unavailable(_)))
    }
}

/// A new tenant with its first (all tenant scopes) credential.
#[derive(Debug)]
pub struct NewTenant {
    /// The tenant.
    pub tenant: TenantRow,
    /// Its credential: the secret is shown once and never stored.
    pub credential: IssuedCredential,
}

/// An API key as listings show it: never its secret nor the secret's digest.
#[derive(Debug, Clone)]
pub struct ApiKeyInfo {
    /// The public key id.
    pub key_id: String,
    /// Its tenant; `None`: an operator key.
    pub tenant_id: Option<TenantId>,
    /// What it may do.
    pub scopes: Scopes,
    /// The SPKI SHA-256 of the client certificate it is bound to, if any.
    pub cert_spki_sha256: Option<[u8; 32]>,
    /// Creation time (Unix ms).
    pub created_at: i64,
    /// Revocation time (Unix ms), if revoked.
    pub revoked_at: Option<i64>,
}

/// A tenant as the API shows it.
#[derive(Debug, Clone)]
pub struct TenantInfo {
    /// Its id.
    pub id: TenantId,
    /// Its unique name.
    pub name: String,
    /// When it was created (Unix ms).
    pub created_at: i64,
    /// When it was disabled (Unix ms), if it was.
    pub disabled_at: Option<i64>,
}

impl From<TenantRow> for TenantInfo {
    fn from(t: TenantRow) -> Self {
        TenantInfo {
            id: t.id,
            name: t.name,
            created_at: t.created_at,
            disabled_at: t.disabled_at,
        }
    }
}

/// Checks a tenant name and returns it trimmed.
fn tenant_name(name: &str) -> Result<&str, AccountError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(AccountError::InvalidName);
    }
    Ok(name)
}

/// Creates a tenant, without any API key.
pub async fn insert_tenant(store: &Store, name: &str) -> Result<TenantRow, AccountError> {
    let name = tenant_name(name)?;
    let tenant = TenantRow {
        id: TenantId::new_random(),
        name: name.to_string(),
        created_at: now_ms(),
        disabled_at: None,
    };
    match store.insert_tenant(&tenant).await {
        Err(StoreError::Conflict(_)) => Err(AccountError::TenantExists(name.to_string())),
        other => other.map(|()| tenant).map_err(Into::into),
    }
}

/// Creates a tenant and an API key with every tenant scope for it: it can do
/// everything inside the tenant and nothing outside it.
pub async fn create_tenant(store: &Store, name: &str) -> Result<NewTenant, AccountError> {
    let tenant = insert_tenant(store, name).await?;
    // A new tenant has no key yet: any bound of at least one admits this one.
    let credential = create_api_key(store, tenant.id, Scopes::tenant_all(), None, 1).await?;
    Ok(NewTenant { tenant, credential })
}

/// Issues an API key for a tenant, optionally bound to a client certificate's
/// public key (SHA-256 of its SubjectPublicKeyInfo). Tenant scopes only; at
/// most `max_live` live (not revoked) keys per tenant, so that no listing or
/// cache is flooded by one tenant's keys.
pub async fn create_api_key(
    store: &Store,
    tenant: TenantId,
    scopes: Scopes,
    cert_spki_sha256: Option<[u8; 32]>,
    max_live: i64,
) -> Result<IssuedCredential, AccountError> {
    scopes
        .check_kind(true)
        .map_err(AccountError::WrongKindOfScope)?;
    match store.tenant(tenant).await? {
        None => return Err(AccountError::TenantNotFound(tenant)),
        Some(t) if t.disabled_at.is_some() => return Err(AccountError::TenantDisabled(tenant)),
        Some(_) => {}
    }
    let credential = issue_credential();
    let row = key_row(&credential, Some(tenant), scopes, cert_spki_sha256);
    if !store
        .insert_tenant_api_key_within(&row, tenant, max_live)
        .await?
    {
        return Err(AccountError::ApiKeyLimitReached(max_live));
    }
    Ok(credential)
}

/// Issues an operator API key (no tenant), optionally bound to a client
/// certificate. Operator scopes only.
pub async fn create_operator_key(
    store: &Store,
    scopes: Scopes,
    cert_spki_sha256: Option<[u8; 32]>,
) -> Result<IssuedCredential, AccountError> {
    scopes
        .check_kind(false)
        .map_err(AccountError::WrongKindOfScope)?;
    insert_key(store, None, scopes, cert_spki_sha256).await
}

async fn insert_key(
    store: &Store,
    tenant: Option<TenantId>,
    scopes: Scopes,
    cert_spki_sha256: Option<[u8; 32]>,
) -> Result<IssuedCredential, AccountError> {
    let credential = issue_credential();
    store
        .insert_api_key(&key_row(&credential, tenant, scopes, cert_spki_sha256))
        .await?;
    Ok(credential)
}

/// The row of a new key: its secret only as the digest.
fn key_row(
    credential: &IssuedCredential,
    tenant: Option<TenantId>,
    scopes: Scopes,
    cert_spki_sha256: Option<[u8; 32]>,
) -> ApiKeyRow {
    ApiKeyRow {
        id: credential.key_id.clone(),
        tenant_id: tenant,
        secret_sha256: credential.secret_sha256.to_vec(),
        scopes: scopes.to_string(),
        cert_spki_sha256: cert_spki_sha256.map(|d| d.to_vec()),
        created_at: now_ms(),
        revoked_at: None,
    }
}

/// Revokes an API key (with `tenant`, only one of that tenant's); every running
/// Keyward drops it from its cache within one `sync_interval`. `false` if there
/// was no such live key.
pub async fn revoke_api_key(
    store: &Store,
    key_id: &str,
    tenant: Option<TenantId>,
) -> Result<bool, AccountError> {
    Ok(store.revoke_api_key(key_id, tenant, now_ms()).await?)
}

/// Disables a tenant: its API keys stop working on every running Keyward
/// within one `sync_interval`. `false` if it was already disabled.
pub async fn disable_tenant(store: &Store, tenant: TenantId) -> Result<bool, AccountError> {
    if store.tenant(tenant).await?.is_none() {
        return Err(AccountError::TenantNotFound(tenant));
    }
    Ok(store.disable_tenant(tenant, now_ms()).await?)
}

/// Where a page of API keys starts: after the key created at `created_at`
/// with id `key_id` (the last key of the previous page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyCursor {
    /// The previous page's last key's creation time (Unix ms).
    pub created_at: i64,
    /// The previous page's last key's id.
    pub key_id: String,
}

impl ApiKeyCursor {
    /// The cursor that continues after `key`.
    pub fn after(key: &ApiKeyInfo) -> ApiKeyCursor {
        ApiKeyCursor {
            created_at: key.created_at,
            key_id: key.key_id.clone(),
        }
    }
}

/// Up to `limit` API keys of `tenant` (`None`: the operator keys) after
/// `after`, oldest first, without secrets or digests. `limit` is bounded by
/// one more than [`LIST_LIMIT`] (a page, and one to tell whether another
/// follows).
pub async fn api_keys(
    store: &Store,
    tenant: Option<TenantId>,
    after: Option<&ApiKeyCursor>,
    limit: i64,
) -> Result<Vec<ApiKeyInfo>, AccountError> {
    let after = after.map(|c| (c.created_at, c.key_id.as_str()));
    let rows = store
        .api_keys_of(tenant, after, limit.clamp(1, LIST_LIMIT + 1))
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| ApiKeyInfo {
            // A stored list that no longer parses shows as no scopes, never as
            // more than it had (authentication refuses such a key anyway).
            scopes: Scopes::parse(&row.scopes).unwrap_or_default(),
            cert_spki_sha256: row
                .cert_spki_sha256
                .as_deref()
                .and_then(|d| d.try_into().ok()),
            key_id: row.id,
            tenant_id: row.tenant_id,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        })
        .collect())
}

impl KeyService {
    /// Creates a tenant (no key: see [`KeyService::create_tenant_key`]).
    pub async fn register_tenant(&self, name: &str) -> Result<TenantInfo, AccountError> {
        insert_tenant(self.store(), name).await.map(Into::into)
    }

    /// Up to `limit` (at most one more than [`LIST_LIMIT`]) tenants after
    /// `after`, oldest first.
    pub async fn tenants(
        &self,
        after: Option<TenantId>,
        limit: i64,
    ) -> Result<Vec<TenantInfo>, AccountError> {
        let rows = self
            .store()
            .tenants(after, limit.clamp(1, LIST_LIMIT + 1))
            .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// One tenant.
    pub async fn tenant(&self, tenant: TenantId) -> Result<TenantInfo, AccountError> {
        self.store()
            .tenant(tenant)
            .await?
            .map(Into::into)
            .ok_or(AccountError::TenantNotFound(tenant))
    }

    /// Disables a tenant; its keys stop working here at once and elsewhere
    /// within one `sync_interval`. Disabling a disabled tenant changes nothing.
    pub async fn disable_tenant(&self, tenant: TenantId) -> Result<TenantInfo, AccountError> {
        disable_tenant(self.store(), tenant).await?;
        self.api_key_cache().invalidate_tenant(tenant);
        self.tenant(tenant).await
    }

    /// Issues a key for `tenant` on an operator's behalf.
    pub async fn create_tenant_key(
        &self,
        tenant: TenantId,
        scopes: Scopes,
        cert_spki_sha256: Option<[u8; 32]>,
    ) -> Result<IssuedCredential, AccountError> {
        create_api_key(
            self.store(),
            tenant,
            scopes,
            cert_spki_sha256,
            self.max_api_keys_per_tenant(),
        )
        .await
    }

    /// Issues a key in the caller's own tenant: only with scopes the caller
    /// holds, and, if the caller is bound to a client certificate, bound to
    /// the same one (so a new key never escapes its creator's limits).
    pub async fn create_own_key(
        &self,
        caller: &Principal,
        tenant: TenantId,
        scopes: Scopes,
        cert_spki_sha256: Option<[u8; 32]>,
    ) -> Result<IssuedCredential, AccountError> {
        scopes
            .check_kind(true)
            .map_err(AccountError::WrongKindOfScope)?;
        if !scopes.is_subset_of(caller.scopes) {
            let missing = Scopes::parse_words(
                scopes
                    .names()
                    .into_iter()
                    .filter(|n| !caller.scopes.names().contains(n)),
            )
            .unwrap_or_default();
            return Err(AccountError::ScopeNotHeld(missing));
        }
        let binding = match (caller.cert_spki_sha256, cert_spki_sha256) {
            (None, asked) => asked,
            (Some(own), None) => Some(own),
            (Some(own), Some(asked)) if own == asked => Some(own),
            (Some(_), Some(_)) => return Err(AccountError::CertificateBindingRequired),
        };
        create_api_key(
            self.store(),
            tenant,
            scopes,
            binding,
            self.max_api_keys_per_tenant(),
        )
        .await
    }

    /// Up to `limit` API keys of `tenant` after `after`, oldest first,
    /// without secrets or digests.
    pub async fn api_keys(
        &self,
        tenant: TenantId,
        after: Option<&ApiKeyCursor>,
        limit: i64,
    ) -> Result<Vec<ApiKeyInfo>, AccountError> {
        api_keys(self.store(), Some(tenant), after, limit).await
    }

    /// Revokes one of `tenant`'s keys; it stops working here at once and
    /// elsewhere within one `sync_interval`. Another tenant's key, an operator
    /// key, or an unknown or revoked one is [`AccountError::ApiKeyNotFound`].
    pub async fn revoke_tenant_key(
        &self,
        tenant: TenantId,
        key_id: &str,
    ) -> Result<(), AccountError> {
        if !revoke_api_key(self.store(), key_id, Some(tenant)).await? {
            return Err(AccountError::ApiKeyNotFound);
        }
        self.api_key_cache().invalidate(key_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::apikeys::Scope;

    #[tokio::test]
    async fn keys_made_before_operator_keys_existed_keep_working_inside_their_tenant() {
        let store = Store::connect("sqlite::memory:", 1).await.unwrap();
        store.migrate_before(10).await.unwrap();
        // A tenant and its all-scopes key, as `tenant create` wrote them before.
        let tenant = TenantId::new_random();
        let credential = issue_credential();
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, 'old', 1)")
            .bind(tenant.to_string())
            .execute(store.pool_for_tests())
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, secret_sha256, scopes, created_at) \
             VALUES ($1, $2, $3, 'encrypt,decrypt,rotate,manage,admin', 1)",
        )
        .bind(&credential.key_id)
        .bind(tenant.to_string())
        .bind(credential.secret_sha256.to_vec())
        .execute(store.pool_for_tests())
        .await
        .unwrap();
        store.migrate().await.unwrap();

        let provider = crate::master_key::EnvMasterKey::new(&crate::crypto::DataKey::generate());
        let service = KeyService::new(store, Arc::new(provider), 8);
        let principal = service
            .authenticate(&credential.key_id, &credential.secret)
            .await
            .unwrap();
        assert_eq!(principal.tenant_id, Some(tenant));
        assert!(principal.scopes.contains(Scope::Admin));
        assert!(!principal.scopes.contains(Scope::Operator));
        // The upgraded table takes operator keys, and the tenant can be disabled.
        let operator = create_operator_key(service.store(), Scopes::operator_all(), None)
            .await
            .unwrap();
        let op = service
            .authenticate(&operator.key_id, &operator.secret)
            .await
            .unwrap();
        assert_eq!(op.tenant_id, None);
        service.disable_tenant(tenant).await.unwrap();
        assert!(service
            .authenticate(&credential.key_id, &credential.secret)
            .await
            .is_err());
    }
}
