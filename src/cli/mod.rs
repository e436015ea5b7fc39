//! The command line. Output for machines goes to stdout (`--json`); errors go
//! to stderr with a non-zero exit.
//!
//! This file holds the top-level command and hands each group to its file:
//!
//! - `server.rs`: `dev`, `serve`, `migrate`, `healthcheck` (`openapi` is one
//!   line, here);
//! - `accounts.rs`: `tenant`, `apikey` and `operator-key`, on the database;
//! - `master_key.rs`: `master-key migrate | rotate-kek | status`, on the database;
//! - `job.rs`: re-encryption jobs, over a running Keyward's API ([`crate::client`]);
//! - `audit.rs`: `audit verify`, on a file;
//! - `config_arg.rs`: `--config FILE`, for every command that reads the settings.
//!
//! The group files import nothing from this one, so none imports back what
//! imports it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::dev::DevOptions;

mod accounts;
mod audit;
mod client_cert;
mod config_arg;
mod exit;
mod files;
mod job;
mod master_key;
mod server;

use accounts::{ApikeyCommand, OperatorKeyCommand, TenantCommand};
use audit::AuditCommand;
use client_cert::ClientCertCommand;
use config_arg::ConfigArg;
pub use exit::ExitWith;
use job::JobCommand;
use master_key::MasterKeyCommand;

/// Keyward: an encryption service with per-tenant versioned keys.
#[derive(Debug, Parser)]
#[command(name = "keyward", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a development server: no setup, SQLite and a generated master key in a
    /// data folder, plain HTTP (or, with --tls, mutual TLS) on loopback. Never
    /// for real data.
    Dev {
        /// Folder for the database, master key and dev credentials.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Address to listen on (loopback only).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8480")]
        listen: SocketAddr,
        /// Write {"tenantId","apiKey","apiSecret","encryptionId"} to FILE once serving.
        #[arg(long, value_name = "FILE")]
        credentials_out: Option<PathBuf>,
        /// Serve mutual TLS with a generated dev CA, server and client certificate
        /// (kept in the data folder).
        #[arg(long)]
        tls: bool,
        /// A job sources file: the databases re-encryption jobs may reach
        /// (see docs/jobs.md; the dev tenant is named `dev`).
        #[arg(long, value_name = "FILE")]
        job_sources: Option<PathBuf>,
    },
    /// Run the production server (settings from --config and KEYWARD_* variables).
    Serve(ConfigArg),
    /// Apply the database migrations to KEYWARD_DATABASE_URL.
    Migrate(ConfigArg),
    /// Print the OpenAPI document (as served at /openapi.json).
    Openapi,
    /// Exit 0 if Keyward at URL answers /healthz (for container HEALTHCHECKs;
    /// point it at the plain-HTTP ops listener).
    Healthcheck {
        /// Base URL of the ops listener (or the API on plain HTTP).
        #[arg(long, default_value = "http://127.0.0.1:8481")]
        url: String,
    },
    /// The master key: migrate to another provider, rotate the root KEK, status.
    MasterKey {
        #[command(subcommand)]
        command: MasterKeyCommand,
    },
    /// Manage tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Manage tenants' API keys.
    Apikey {
        #[command(subcommand)]
        command: ApikeyCommand,
    },
    /// Manage operator keys (keys that run the service and belong to no tenant).
    OperatorKey {
        #[command(subcommand)]
        command: OperatorKeyCommand,
    },
    /// Client certificates from the client CA Keyward holds: issue (binding
    /// an API key), revoke (onto the CRL every listener enforces), list.
    ClientCert {
        #[command(subcommand)]
        command: ClientCertCommand,
    },
    /// Re-encryption jobs on a running Keyward (over its API).
    Job {
        #[command(subcommand)]
        command: Box<JobCommand>,
    },
    /// Encrypt a file of any size through a running Keyward's data keys
    /// (the file never crosses the network): docs/envelope.md.
    EncryptFile(files::EncryptFileArgs),
    /// Decrypt a file made by encrypt-file.
    DecryptFile(files::DecryptFileArgs),
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev {
            data_dir,
            listen,
            credentials_out,
            tls,
            job_sources,
        } => {
            server::dev(DevOptions {
                data_dir,
                listen,
                credentials_out,
                tls,
                job_sources,
            })
            .await
        }
        Command::Serve(config) => server::serve(&config).await,
        Command::Migrate(config) => server::migrate(&config).await,
        Command::Openapi => {
            print!("{}", crate::http::openapi::document());
            Ok(())
        }
        Command::Healthcheck { url } => server::healthcheck(&url).await,
        Command::MasterKey { command } => master_key::run(command).await,
        Command::Tenant { command } => accounts::run_tenant(command).await,
        Command::Apikey { command } => accounts::run_apikey(command).await,
        Command::ClientCert { command } => client_cert::run(command).await,
        Command::OperatorKey { command } => accounts::run_operator_key(command).await,
        Command::Job { command } => job::run(*command).await,
        Command::EncryptFile(args) => files::encrypt_file(args).await,
        Command::DecryptFile(args) => files::decrypt_file(args).await,
        Command::Audit { command } => audit::run(command).await,
    }
    .context("keyward failed")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
