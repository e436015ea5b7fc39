//! Black-box tests: the real `keyward` binary on port 0 against a fresh SQLite
//! file or PostgreSQL database per test. Each file reads as a specification.

mod abuse;
mod acme;
mod audit;
mod auth;
mod authority;
mod azure;
mod blind_index;
mod checkpoints;
mod cli;
mod client_cert;
mod client_key;
mod connections;
mod contract;
mod datakey;
mod deterministic;
mod dev;
mod envelope_context;
mod faults;
mod guards;
mod helpers;
mod input;
mod integrity;
mod integrity_schedule;
mod job_integrity;
mod jobs;
mod key_import;
mod key_listings;
mod lifecycle;
mod management;
mod memory;
mod metrics;
mod openapi_clients;
mod packaging;
mod pkcs11;
mod pki;
mod providers;
mod replicas;
mod rsa_oaep;
mod secret_ref;
mod secrets;
mod slow_input;
mod sources;
mod stream;
mod tls;
mod tpm;
mod versions;

/// SHA-256 of the SubjectPublicKeyInfo of the certificate in a PEM file, hex.
pub fn pki_spki_hex(pem: &std::path::Path) -> String {
    let der = std::fs::read(pem).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&der).unwrap();
    let cert = p.parse_x509().unwrap();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.public_key().raw);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
