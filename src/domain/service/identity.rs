//! Authentication: an API key id and secret to a [`Principal`].

use std::sync::Arc;

use super::state::KeyService;
use crate::domain::apikeys::{
    burn_secret_check, looks_like_key_id, record_from_row, Lookup, Principal,
};
use crate::domain::error::AuthError;

impl KeyService {
    /// Checks an API key id and secret. Costs no query once the key is cached.
    pub async fn authenticate(&self, key_id: &str, secret: &str) -> Result<Principal, AuthError> {
        let record = if !looks_like_key_id(key_id) {
            None
        } else {
            match self.api_keys.lookup(key_id) {
                Lookup::Found(r) => Some(r),
                Lookup::KnownUnknown => None,
                Lookup::NotCached(generation) => match self.store.api_key(key_id).await? {
                    // A revoked key and a key of a disabled tenant are refused
                    // like an unknown one.
                    Some(found) if found.key.revoked_at.is_none() && !found.tenant_disabled => {
                        let record = Arc::new(record_from_row(found.key)?);
                        self.api_keys.insert(record.clone(), generation);
                        Some(record)
                    }
                    _ => {
                        self.api_keys.remember_unknown(key_id);
                        None
                    }
                },
            }
        };
        match record {
            Some(r) if r.secret_matches(secret) => Ok(r),
            Some(_) => Err(AuthError::InvalidCredentials),
            None => {
                burn_secret_check(secret);
                Err(AuthError::InvalidCredentials)
            }
        }
    }
}
