//! [`KeyService`]: every Keyward operation, over the store, the key ring and the
//! root keys. HTTP handlers and the CLI call these methods and never touch SQL
//! or key bytes themselves.
//!
//! One type, cut at its seams into files that each add an `impl KeyService`:
//!
//! - [`state`]: the service's fields, each with its concurrency argument, and
//!   how it is built;
//! - `identity`: API-key authentication;
//! - `contract`: encrypt, decrypt, rewrap and rotate, the v1 contract;
//! - `management`: creating and reading encryptions;
//! - `lifecycle`: policies, version states, automatic rotation;
//! - `root_keys`: loading and rotating the root KEKs, sealing job sources,
//!   migrating the master key;
//! - `cache`: loading encryptions into the key ring;
//! - `queries`: what handlers read besides keys (jobs, root-KEK status,
//!   audit records, readiness, the figures `/metrics` shows).
//!
//! The rules a change must satisfy live in the versioned key object
//! ([`super::keys`]); these files check them, persist, then refresh the ring.

mod cache;
mod contract;
mod datakeys;
mod identity;
mod import;
mod lifecycle;
mod management;
mod queries;
mod root_keys;
mod search;
pub mod state;

pub use super::apikeys::{looks_like_key_id, Principal};
pub use super::client_key::ClientKey;
pub use super::error::{AuthError, KeyError, RootKeyError};
pub use contract::{Encrypted, Sealed};
pub use datakeys::{wrapped_key_version, GeneratedDataKey};
pub use management::{EncryptionDetails, EncryptionOptions};
pub use queries::RootKekInfo;
pub use root_keys::migrate_master_key;
pub use search::{IndexSelection, IndexValue};
pub use state::{Freshness, KeyService, ServiceLimits, SystemRecorder};
