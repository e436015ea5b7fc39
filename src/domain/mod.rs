//! The domain: identifiers, the versioned key object, API keys and scopes, the
//! caller's certificate identity, the in-memory key ring, and the service that
//! carries out every operation. Handlers and the CLI call into
//! [`service::KeyService`]; it talks to the store and to the pure crypto module.

pub mod accounts;
pub mod algorithm;
pub mod apikeys;
pub mod cert_status;
pub mod client_addr;
pub mod client_key;
pub mod error;
pub mod guard;
pub mod identity;
pub mod ids;
pub mod jobs;
pub mod keyring;
pub mod keys;
pub mod records;
pub mod search;
pub mod service;
pub mod sources;
pub mod states;
pub mod sync;
pub mod time;

pub use ids::{EncryptionId, KekId, TenantId, VersionId};
