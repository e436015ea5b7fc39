//! # Keyward
//!
//! A small, fast encryption service. A core platform sends plaintext over
//! (mutual) TLS and gets back ciphertext plus the key id and version that made
//! it; later it sends the ciphertext back to be decrypted. The platform never
//! holds key material; Keyward never holds the platform's data.
//!
//! ## Layers
//!
//! Imports point down this list, never up, and no two files import each
//! other in a circle (`scripts/layers.py`, run by `scripts/test`, reads every
//! `use` line and fails otherwise):
//!
//! ```text
//! entry     main, cli/, client, config, startup, server, tls, dev/, telemetry
//!   │         parse the command line and settings, build and run the app
//! http      one file per resource, a route table (method, path, scope, body
//!   │         limit, audited operation), one error type, the edge
//! audit     records, the hash chain, the writer, the table, verify
//!   │
//! domain    the service (cut into contract, management, lifecycle, root
//!   │         keys, cache, queries), the versioned key object, the key ring,
//!   │         API keys, jobs, the change feed, the auth guard
//! store, master_key   one Store over SQLite and PostgreSQL (and the job's
//!   │         source table); one provider trait per master-key custody
//! crypto    pure: AES-256-GCM, key wrapping, HKDF, digests, hex
//!   │
//! vocabulary  domain::ids, domain::time, domain::states, domain::records, json,
//!             owner_only, secret_cell
//! ```
//!
//! Handlers never import the store: the domain offers the views and queries
//! they need. Crypto never imports axum, sqlx or tokio. The service records
//! what it does by itself through [`domain::service::SystemRecorder`], which
//! the audit log implements at startup, so the domain does not import the
//! audit layer above it.
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

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod acme;
pub mod audit;
pub mod cli;
pub mod client;
pub mod client_ca;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod domain;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod http;
pub mod json;
pub mod master_key;
pub mod memory;
pub mod owner_only;
pub mod secret_cell;
pub mod server;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
