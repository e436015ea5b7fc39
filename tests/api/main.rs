//! Black-box tests: the real `keyward` binary on port 0 against a fresh SQLite
//! file or PostgreSQL database per test. Each file reads as a specification.

mod auth;
mod cli;
mod client_key;
mod contract;
mod dev;
mod helpers;
mod input;
mod lifecycle;
mod management;
mod secrets;
