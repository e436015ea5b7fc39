//! API keys: scopes, issuing credentials, and the in-memory cache that lets
//! authentication run without a database query.
//!
//! A credential is a public key id (`X-Api-Key`, `kw_` + 24 hex digits) and a
//! secret (`X-Api-Secret`, `kws_` + base64url of 32 random bytes). Only the
//! SHA-256 of the secret is stored; the secret is random, so a fast digest is as
//! strong as a slow password hash here and keeps authentication off the CPU
//! budget of the request path. Digests are compared in constant time.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::ids::TenantId;
use crate::crypto::{random_bytes, sha256};
use crate::store::{ApiKeyRow, StoreError};

/// One permission an API key can carry. A tenant key carries some of
/// `encrypt`, `decrypt`, `rotate`, `manage`, `admin`, and acts only inside its
/// tenant; an operator key carries some of `operator`, `audit`, belongs to no
/// tenant, and never touches a tenant's keys or data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `POST /v1/encrypt`.
    Encrypt,
    /// `POST /v1/decrypt`.
    Decrypt,
    /// `POST /v1/rotate`.
    Rotate,
    /// Create and inspect encryptions and jobs.
    Manage,
    /// The administration of its own tenant: its API keys, its audit records.
    Admin,
    /// The service (operator keys only): tenants, any tenant's API keys, the
    /// root KEK.
    Operator,
    /// Read every tenant's audit records (operator keys only), e.g. for a SIEM.
    Audit,
    /// Compute blind-index values (`POST /v1/index`, and `indexes` on
    /// encrypt). Never grants `decrypt`, and is not needed for it.
    Index,
    /// Import key material as a new version (bring your own key). Its own
    /// scope: a key that can choose an encryption's key can read whatever
    /// is encrypted under it afterwards.
    Import,
    /// Export an exportable encryption's key material, wrapped to a public
    /// key the caller supplies.
    Export,
    /// Mint data keys (`POST /v1/datakey`, in plaintext and wrapped, or
    /// wrapped only). Cannot unwrap one.
    DataKey,
    /// Unwrap a data key (`POST /v1/datakey/unwrap`). Its own scope, so a
    /// key that mints wrapped data keys for others cannot open them.
    Unwrap,
}

impl Scope {
    /// Every scope, in display order.
    pub const ALL: [Scope; 12] = [
        Scope::Encrypt,
        Scope::Decrypt,
        Scope::Rotate,
        Scope::Manage,
        Scope::Admin,
        Scope::Index,
        Scope::Import,
        Scope::Export,
        Scope::DataKey,
        Scope::Unwrap,
        Scope::Operator,
        Scope::Audit,
    ];

    /// The name used in the CLI, the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Encrypt => "encrypt",
            Scope::Decrypt => "decrypt",
            Scope::Rotate => "rotate",
            Scope::Manage => "manage",
            Scope::Admin => "admin",
            Scope::Operator => "operator",
            Scope::Audit => "audit",
            Scope::Index => "index",
            Scope::Import => "import",
            Scope::Export => "export",
            Scope::DataKey => "datakey",
            Scope::Unwrap => "unwrap",
        }
    }

    /// Whether only an operator key may carry this scope.
    pub fn is_operator(self) -> bool {
        matches!(self, Scope::Operator | Scope::Audit)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u16);

impl Scopes {
    /// Every scope a tenant key can carry: all it can do inside its tenant.
    pub fn tenant_all() -> Scopes {
        Scopes::of(|s| !s.is_operator())
    }

    /// Every scope an operator key can carry.
    pub fn operator_all() -> Scopes {
        Scopes::of(Scope::is_operator)
    }

    fn of(include: impl Fn(Scope) -> bool) -> Scopes {
        Scopes(
            Scope::ALL
                .iter()
                .filter(|s| include(**s))
                .fold(0, |acc, s| acc | s.bit()),
        )
    }

    /// Whether `scope` is in the set.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Whether every scope of `self` is in `other`.
    pub fn is_subset_of(self, other: Scopes) -> bool {
        self.0 & !other.0 == 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Parses `encrypt,decrypt,...`; an unknown or empty list is an error naming
    /// the offending word.
    pub fn parse(list: &str) -> Result<Scopes, String> {
        Scopes::parse_words(list.split(','))
    }

    /// Parses scope names one by one, like [`Scopes::parse`].
    pub fn parse_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<Scopes, String> {
        let mut bits = 0;
        for word in words.into_iter().map(str::trim).filter(|w| !w.is_empty()) {
            let scope = Scope::ALL
                .iter()
                .find(|s| s.as_str() == word)
                .ok_or_else(|| {
                    let word: String = word.chars().take(32).collect();
                    format!(
                        "unknown scope `{word}` (expected some of encrypt, decrypt, rotate, manage, admin, index, import, export, datakey, unwrap for a tenant key, or operator, audit for an operator key)"
                    )
                })?;
            bits |= scope.bit();
        }
        if bits == 0 {
            return Err("at least one scope is required".into());
        }
        Ok(Scopes(bits))
    }

    /// Checks that the set suits a key of this kind: a tenant key
    /// (`tenant == true`) only tenant scopes, an operator key only operator
    /// scopes.
    pub fn check_kind(self, tenant: bool) -> Result<(), String> {
        let allowed = if tenant {
            Scopes::tenant_all()
        } else {
            Scopes::operator_all()
        };
        if self.is_subset_of(allowed) {
            Ok(())
        } else if tenant {
            Err(
                "a tenant key takes only encrypt, decrypt, rotate, manage, admin, import, export"
                    .into(),
            )
        } else {
            Err("an operator key takes only operator, audit".into())
        }
    }

    /// The scope names, in display order.
    pub fn names(self) -> Vec<&'static str> {
        Scope::ALL
            .iter()
            .filter(|s| self.contains(**s))
            .map(|s| s.as_str())
            .collect()
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scopes({self})")
    }
}

/// A freshly issued credential. The secret exists in the clear only here, to be
/// shown once.
pub struct IssuedCredential {
    /// The public key id.
    pub key_id: String,
    /// The secret, zeroed on drop.
    pub secret: Zeroizing<String>,
    /// SHA-256 of the secret, to store.
    pub secret_sha256: [u8; 32],
}

impl fmt::Debug for IssuedCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IssuedCredential({}, <secret redacted>)", self.key_id)
    }
}

/// Mints a new key id and secret.
pub fn issue_credential() -> IssuedCredential {
    let id_bytes: [u8; 12] = random_bytes();
    let key_id = format!("kw_{}", crate::crypto::hex(&id_bytes));
    let secret_bytes = Zeroizing::new(random_bytes::<32>());
    let secret = Zeroizing::new(format!(
        "kws_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret_bytes.as_ref())
    ));
    let secret_sha256 = sha256(secret.as_bytes());
    IssuedCredential {
        key_id,
        secret,
        secret_sha256,
    }
}

/// An API key as the authenticator needs it.
#[derive(Clone)]
pub struct ApiKeyRecord {
    /// Public key id.
    pub key_id: String,
    /// The tenant it acts for; `None`: an operator key, which acts for no
    /// tenant.
    pub tenant_id: Option<TenantId>,
    /// SHA-256 of the secret.
    pub secret_sha256: [u8; 32],
    /// What it may do.
    pub scopes: Scopes,
    /// SHA-256 of the SubjectPublicKeyInfo of the one client certificate it may
    /// be used with, if bound.
    pub cert_spki_sha256: Option<[u8; 32]>,
}

impl fmt::Debug for ApiKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyRecord")
            .field("key_id", &self.key_id)
            .field("tenant_id", &self.tenant_id)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

impl ApiKeyRecord {
    /// Whether `secret` is this key's secret, in constant time.
    pub fn secret_matches(&self, secret: &str) -> bool {
        sha256(secret.as_bytes()).ct_eq(&self.secret_sha256).into()
    }
}

/// Compares `secret` against a fixed digest, so that an unknown key id costs
/// the same work as a known one.
pub fn burn_secret_check(secret: &str) {
    let _ = sha256(secret.as_bytes()).ct_eq(&[0u8; 32]);
}

/// How long a cached key is trusted before it is read again: a bound on how long
/// a revocation can go unseen even if the change feed were lost.
const MAX_AGE: Duration = Duration::from_secs(300);

/// How long an unknown key id is remembered as unknown (to spare the database
/// from repeated lookups of a bad id); short, because a key created by the CLI
/// or another replica must start working promptly.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);

/// What the cache knows about a key id.
pub enum Lookup {
    /// A live key.
    Found(Arc<ApiKeyRecord>),
    /// Recently looked up and not found (or revoked).
    KnownUnknown,
    /// Not cached: look it up in the store, then pass this generation to
    /// [`ApiKeyCache::insert`].
    NotCached(u64),
}

/// The in-memory API key cache. Bounded; revocations arrive through the change
/// feed (see [`crate::domain::sync`]).
#[derive(Debug)]
pub struct ApiKeyCache {
    keys: RwLock<HashMap<String, (Arc<ApiKeyRecord>, Instant)>>,
    unknown: Mutex<HashMap<String, Instant>>,
    capacity: usize,
    /// Bumped by every invalidation; a lookup that raced a revocation does not
    /// reinstate the revoked key (see [`ApiKeyCache::insert`]).
    generation: AtomicU64,
}

impl ApiKeyCache {
    /// An empty cache for at most `capacity` keys (and as many unknown ids).
    pub fn new(capacity: usize) -> Self {
        ApiKeyCache {
            keys: RwLock::new(HashMap::new()),
            unknown: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            generation: AtomicU64::new(0),
        }
    }

    /// What the cache knows about `key_id`.
    pub fn lookup(&self, key_id: &str) -> Lookup {
        if let Some((k, loaded)) = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key_id)
        {
            if loaded.elapsed() < MAX_AGE {
                return Lookup::Found(k.clone());
            }
        }
        let generation = self.generation.load(Ordering::Acquire);
        let mut unknown = self.unknown.lock().unwrap_or_else(|e| e.into_inner());
        match unknown.get(key_id) {
            Some(at) if at.elapsed() < NEGATIVE_TTL => Lookup::KnownUnknown,
            Some(_) => {
                unknown.remove(key_id);
                Lookup::NotCached(generation)
            }
            None => Lookup::NotCached(generation),
        }
    }

    /// Caches a live key read from the store, unless an invalidation happened
    /// since the lookup that returned `generation`.
    pub fn insert(&self, record: Arc<ApiKeyRecord>, generation: u64) {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if keys.len() >= self.capacity && !keys.contains_key(&record.key_id) {
            if let Some(victim) = keys.keys().next().cloned() {
                keys.remove(&victim);
            }
        }
        keys.insert(record.key_id.clone(), (record, Instant::now()));
    }

    /// Remembers briefly that `key_id` is not a live key.
    pub fn remember_unknown(&self, key_id: &str) {
        let mut unknown = self.unknown.lock().unwrap_or_else(|e| e.into_inner());
        if unknown.len() >= self.capacity {
            unknown.retain(|_, at| at.elapsed() < NEGATIVE_TTL);
            if unknown.len() >= self.capacity {
                unknown.clear();
            }
        }
        unknown.insert(key_id.to_string(), Instant::now());
    }

    /// Forgets `key_id` (revoked or changed elsewhere).
    pub fn invalidate(&self, key_id: &str) {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        keys.remove(key_id);
    }

    /// Forgets every key of `tenant` (disabled).
    pub fn invalidate_tenant(&self, tenant: TenantId) {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        keys.retain(|_, (k, _)| k.tenant_id != Some(tenant));
    }

    /// Forgets every key.
    pub fn clear(&self) {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        keys.clear();
    }
}

/// Who is calling: the authenticated API key, shared with the cache so that a
/// request copies a pointer, not the key id.
pub type Principal = Arc<ApiKeyRecord>;

/// Whether `key_id` has the form of an API key id (`kw_` + 24 hex digits).
pub fn looks_like_key_id(key_id: &str) -> bool {
    key_id.len() == 27
        && key_id.starts_with("kw_")
        && key_id[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached record of a stored key row; a row that does not decode is
/// corrupt, never a valid key.
pub(crate) fn record_from_row(row: ApiKeyRow) -> Result<ApiKeyRecord, StoreError> {
    let corrupt = |detail: &str| StoreError::Corrupt {
        table: "api_keys",
        detail: detail.to_string(),
    };
    let scopes = Scopes::parse(&row.scopes).map_err(|e| corrupt(&e))?;
    // A row that mixes the two kinds of identity is never a valid key.
    scopes
        .check_kind(row.tenant_id.is_some())
        .map_err(|e| corrupt(&e))?;
    Ok(ApiKeyRecord {
        secret_sha256: row
            .secret_sha256
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("secret digest is not 32 bytes"))?,
        scopes,
        cert_spki_sha256: row
            .cert_spki_sha256
            .map(|d| d.as_slice().try_into())
            .transpose()
            .map_err(|_| corrupt("certificate digest is not 32 bytes"))?,
        key_id: row.id,
        tenant_id: row.tenant_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_print() {
        let s = Scopes::parse("decrypt, encrypt").unwrap();
        assert!(s.contains(Scope::Encrypt) && s.contains(Scope::Decrypt));
        assert!(!s.contains(Scope::Admin));
        assert_eq!(s.to_string(), "encrypt,decrypt");
        assert!(Scopes::parse("encrypt,root").unwrap_err().contains("root"));
        assert!(Scopes::parse("").is_err());
        assert_eq!(
            Scopes::parse(&Scopes::tenant_all().to_string()).unwrap(),
            Scopes::tenant_all()
        );
        assert_eq!(
            Scopes::tenant_all().to_string(),
            "encrypt,decrypt,rotate,manage,admin,index,import,export,datakey,unwrap"
        );
        assert_eq!(Scopes::operator_all().to_string(), "operator,audit");
    }

    #[test]
    fn a_key_holds_the_scopes_of_one_kind_only() {
        assert!(Scopes::tenant_all().check_kind(true).is_ok());
        assert!(Scopes::operator_all().check_kind(false).is_ok());
        assert!(Scopes::parse("admin,operator")
            .unwrap()
            .check_kind(true)
            .is_err());
        assert!(Scopes::parse("audit").unwrap().check_kind(true).is_err());
        assert!(Scopes::parse("admin").unwrap().check_kind(false).is_err());
        let reader = Scopes::parse("encrypt").unwrap();
        assert!(reader.is_subset_of(Scopes::tenant_all()));
        assert!(!Scopes::tenant_all().is_subset_of(reader));
    }

    #[test]
    fn issued_secret_matches_only_itself() {
        let c = issue_credential();
        assert!(c.key_id.starts_with("kw_") && c.key_id.len() == 27);
        assert!(c.secret.starts_with("kws_") && c.secret.len() == 47);
        let rec = ApiKeyRecord {
            key_id: c.key_id.clone(),
            tenant_id: Some(TenantId::new_random()),
            secret_sha256: c.secret_sha256,
            scopes: Scopes::tenant_all(),
            cert_spki_sha256: None,
        };
        assert!(rec.secret_matches(&c.secret));
        assert!(!rec.secret_matches("kws_wrong"));
        assert!(!format!("{c:?} {rec:?}").contains(c.secret.as_str()));
    }
}
