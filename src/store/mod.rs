//! Persistence: one [`Store`] over SQLite and PostgreSQL through sqlx's `Any`
//! driver, so every query is written once. Queries use `$1`-style parameters,
//! which both databases accept (multi-row `VALUES` lists excepted: see
//! [`values_list`]), and only the types both share (text, 64-bit integers,
//! bytes). Migrations live in `migrations/sqlite` and
//! `migrations/postgres`: the same tables with each database's type names.
//!
//! Nothing here knows about HTTP; nothing here sees a key in the clear.

mod acme;
mod api_keys;
mod audit;
mod audit_keys;
mod blind_indexes;
mod client_certs;
mod encryptions;
mod events;
mod jobs;
mod pool;
mod root_keks;
mod sealed_secrets;
pub mod source;
mod sql;
mod tenants;
mod wrapping_keys;

pub use acme::{AcmeChallengeRow, AcmeRow};
pub use api_keys::{ApiKeyLookup, ApiKeyRow};
pub use audit::{AuditQuery, AuditSegment, SegmentPacker};
pub use audit_keys::CheckpointKeyRow;
pub use blind_indexes::{BlindIndexRow, BlindIndexVersionRow, IndexChange};
pub use client_certs::{ClientCaRow, ClientCertRow};
pub use encryptions::{EncryptionRow, NewEncryption, NewVersion, RotateOutcome, VersionRow};
pub use events::{EventKind, KeyEvent};
pub use jobs::{JobEvidence, JobProgress, JobRow, JobTotals};
pub use pool::{Backend, Store, StoreError};
pub use root_keks::{RootKekRow, VersionToRewrap};
pub use sealed_secrets::{SealedSecretRow, SealedSlot};
pub use sql::{rows_per_statement, statement_chunks, values_list};
pub use tenants::TenantRow;
pub use wrapping_keys::WrappingKeyRow;
