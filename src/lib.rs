//! # Keyward
//!
//! A small, fast encryption service. A core platform sends plaintext over
//! (mutual) TLS and gets back ciphertext plus the key id and version that made
//! it; later it sends the ciphertext back to be decrypted. The platform never
//! holds key material; Keyward never holds the platform's data.
//!
//! ## Layers
//!
//! Dependencies point one way: [`http`] → [`domain`] → [`crypto`] (pure) and
//! [`store`] (sqlx). Handlers never write SQL; crypto never imports axum or sqlx.
//!
//! - [`http`]: one file per resource, one error type, extractors that
//!   authenticate and check the scope a route needs.
//! - [`domain`]: ids, the versioned key object, API keys, the in-memory
//!   [`domain::keyring::KeyRing`], and [`domain::service::KeyService`], which
//!   carries out every operation.
//! - [`crypto`]: AES-256-GCM sealing and key wrapping with associated data that
//!   binds every ciphertext and wrapped key to its row.
//! - [`store`]: one [`store::Store`] over SQLite and PostgreSQL.
//! - [`master_key`]: the providers that wrap the root KEK.
//!
//! ## Key hierarchy
//!
//! ```text
//! master key (KEYWARD_MASTER_KEY)          client key (X-Master-Key header)
//!   └─ wraps the root KEK (one row)          └─ HKDF-SHA256(client key, per-encryption salt)
//!        └─ wraps each version's data key         └─ wraps each version's data key
//! ```
//!
//! The root KEK is unwrapped once at start; after that, encrypt and decrypt of a
//! platform-managed key touch neither the database nor the provider: the key
//! ring holds unwrapped keys, bounded, invalidated on rotation.
//!
//! ## Security model, briefly
//!
//! API secrets are random 256-bit values stored as SHA-256 digests and compared
//! in constant time. Another tenant's encryption answers exactly like a missing
//! one. Keys live in zeroizing memory and print as `<redacted>`. No secret, key
//! or plaintext is logged, returned in an error, or stored in the clear.
//!
//! ## Non-features
//!
//! Keyward does not store the platform's data, does not log users in, and does
//! not invent cryptography.

pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod domain;
pub mod http;
pub mod json;
pub mod master_key;
pub mod server;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
