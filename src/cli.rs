//! The command line: `dev`, `serve`, `migrate`, `tenant`, `apikey`. Output for
//! machines goes to stdout (`--json`); errors go to stderr with a non-zero exit.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;

use crate::config::{LogFormat, Settings};
use crate::dev::{self, DevOptions};
use crate::domain::accounts;
use crate::domain::apikeys::Scopes;
use crate::domain::TenantId;
use crate::startup::{open_store, shutdown_signal, Application};
use crate::telemetry;

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
    /// Manage API keys.
    Apikey {
        #[command(subcommand)]
        command: ApikeyCommand,
    },
    /// Re-encryption jobs on a running Keyward (over its API).
    Job {
        #[command(subcommand)]
        command: Box<JobCommand>,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check an audit file's hash chain: exit 0 if every record is intact and
    /// linked to the one before; otherwise name the first broken record and exit 1.
    Verify {
        /// The audit file (KEYWARD_AUDIT_FILE), or `-` for standard input.
        file: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// A TOML file with settings (KEYWARD_* variables override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum MasterKeyCommand {
    /// Re-wrap the root KEK under another provider, in one transaction. The
    /// current provider is KEYWARD_MASTER_KEY_PROVIDER; the target's settings
    /// come from its own variables (KEYWARD_NEW_MASTER_KEY for env to env).
    Migrate {
        /// The target provider: env, aws-kms or vault.
        #[arg(long, value_name = "PROVIDER")]
        to: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Make a new root KEK and re-wrap every key version under it, batch by
    /// batch. Resumable: interrupted, it continues at the next run (or when a
    /// server starts).
    RotateKek {
        /// Versions per transaction.
        #[arg(long, default_value_t = 500)]
        batch_size: u32,
        /// Pause between batches, in milliseconds (to spare the database).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// Only finish an interrupted rotation; start no new one.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show the root KEKs, their provider and how many versions each wraps.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
enum JobCommand {
    /// Start a job that moves a table's ciphertexts to the active version.
    Start {
        /// The encryption of every row (or --encryption-id-column).
        #[arg(long)]
        encryption_id: Option<String>,
        /// The platform's database (credentials included; sealed at rest by Keyward).
        #[arg(long, env = "KEYWARD_JOB_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// The table.
        #[arg(long)]
        table: String,
        /// A unique, ordered key column.
        #[arg(long)]
        key_column: String,
        /// The ciphertext column.
        #[arg(long)]
        cipher_text_column: String,
        /// The version id column.
        #[arg(long)]
        version_column: String,
        /// The metadata (JSON text) column.
        #[arg(long)]
        metadata_column: String,
        /// A column with each row's encryption id.
        #[arg(long)]
        encryption_id_column: Option<String>,
        /// Rows per second at most.
        #[arg(long)]
        max_rows_per_second: Option<u32>,
        /// Print the job id as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: crate::client::Remote,
    },
    /// Show a job.
    Status {
        /// The job id.
        job: String,
        #[command(flatten)]
        remote: crate::client::Remote,
    },
    /// Follow a job with a live progress bar until it ends.
    Watch {
        /// The job id.
        job: String,
        #[command(flatten)]
        remote: crate::client::Remote,
    },
    /// Cancel a job.
    Cancel {
        /// The job id.
        job: String,
        #[command(flatten)]
        remote: crate::client::Remote,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant and an all-scopes API key for it.
    Create {
        /// The tenant's unique name.
        name: String,
        /// Print {"tenantId","name","apiKey","apiSecret"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
enum ApikeyCommand {
    /// Create an API key for a tenant.
    Create {
        /// The tenant's id.
        #[arg(long, value_name = "ID")]
        tenant: String,
        /// Comma-separated scopes: encrypt, decrypt, rotate, manage, admin.
        #[arg(long, value_name = "LIST")]
        scopes: String,
        /// Bind the key to this client certificate (PEM): requests with the key
        /// must come over mutual TLS with a certificate for the same public key.
        #[arg(long, value_name = "PEM")]
        bind_cert: Option<PathBuf>,
        /// Print {"apiKey","apiSecret","scopes","boundCertificateSpkiSha256"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke an API key; running servers drop it within one sync interval.
    Revoke {
        /// The API key id (kw_...).
        key: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn settings(config: &ConfigArg) -> anyhow::Result<Settings> {
    Ok(Settings::load(config.config.as_deref(), std::env::vars())?)
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev {
            data_dir,
            listen,
            credentials_out,
            tls,
        } => {
            telemetry::init(LogFormat::Text, "info");
            dev::run(DevOptions {
                data_dir,
                listen,
                credentials_out,
                tls,
            })
            .await
        }
        Command::Serve(config) => {
            let settings = settings(&config)?;
            telemetry::init(settings.log_format, &settings.log_level);
            let app = Application::build(&settings).await?;
            // The master key is no longer needed once the root KEK is unwrapped.
            drop(settings);
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Healthcheck { url } => {
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(3))
                .build()?;
            let status = client
                .get(format!("{}/healthz", url.trim_end_matches('/')))
                .send()
                .await
                .with_context(|| format!("{url} does not answer"))?
                .status();
            if !status.is_success() {
                anyhow::bail!("{url}/healthz answered {status}");
            }
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify { file, json },
        } => audit_verify(&file, json),
        Command::Openapi => {
            print!("{}", crate::http::openapi::document());
            Ok(())
        }
        Command::MasterKey { command } => master_key_command(command).await,
        Command::Job { command } => job_command(*command).await,
        Command::Migrate(config) => {
            let settings = settings(&config)?;
            telemetry::init(settings.log_format, &settings.log_level);
            open_store(&settings).await?.close().await;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Tenant {
            command: TenantCommand::Create { name, json, config },
        } => {
            let store = open_store(&settings(&config)?).await?;
            let created = accounts::create_tenant(&store, &name).await?;
            store.close().await;
            if json {
                println!(
                    "{}",
                    json!({
                        "tenantId": created.tenant.id.to_string(),
                        "name": created.tenant.name,
                        "apiKey": created.credential.key_id,
                        "apiSecret": created.credential.secret.as_str(),
                    })
                );
            } else {
                println!("tenant id:  {}", created.tenant.id);
                println!("name:       {}", created.tenant.name);
                println!("api key:    {}", created.credential.key_id);
                println!(
                    "api secret: {}  (shown once; not stored)",
                    created.credential.secret.as_str()
                );
            }
            Ok(())
        }
        Command::Apikey {
            command:
                ApikeyCommand::Create {
                    tenant,
                    scopes,
                    bind_cert,
                    json,
                    config,
                },
        } => {
            let tenant: TenantId = tenant
                .parse()
                .map_err(|_| anyhow::anyhow!("--tenant: `{tenant}` is not a tenant id (a UUID)"))?;
            let scopes = Scopes::parse(&scopes).map_err(|e| anyhow::anyhow!("--scopes: {e}"))?;
            let binding = bind_cert
                .as_deref()
                .map(crate::tls::spki_sha256_of_pem)
                .transpose()?;
            let store = open_store(&settings(&config)?).await?;
            let credential = accounts::create_api_key(&store, tenant, scopes, binding).await?;
            store.close().await;
            if json {
                println!(
                    "{}",
                    json!({
                        "apiKey": credential.key_id,
                        "apiSecret": credential.secret.as_str(),
                        "scopes": scopes.names(),
                        "boundCertificateSpkiSha256": binding.map(|d| crate::crypto::hex(&d)),
                    })
                );
            } else {
                println!("api key:    {}", credential.key_id);
                println!(
                    "api secret: {}  (shown once; not stored)",
                    credential.secret.as_str()
                );
                println!("scopes:     {scopes}");
                if let Some(d) = binding {
                    println!(
                        "bound to:   client certificate with SPKI SHA-256 {}",
                        crate::crypto::hex(&d)
                    );
                }
            }
            Ok(())
        }
        Command::Apikey {
            command: ApikeyCommand::Revoke { key, config },
        } => {
            let store = open_store(&settings(&config)?).await?;
            let revoked = accounts::revoke_api_key(&store, &key).await?;
            store.close().await;
            if !revoked {
                anyhow::bail!("no live API key `{key}`");
            }
            eprintln!("revoked {key}");
            Ok(())
        }
    }
    .context("keyward failed")
}

async fn master_key_command(command: MasterKeyCommand) -> anyhow::Result<()> {
    use crate::domain::service::{migrate_master_key, KeyService};
    use crate::master_key::{self, ProviderKind};
    match command {
        MasterKeyCommand::Migrate { to, config } => {
            let settings = settings(&config)?;
            let target = ProviderKind::parse(&to).ok_or_else(|| {
                anyhow::anyhow!("--to: `{to}` is not a provider (env, aws-kms or vault)")
            })?;
            let from = master_key::build(settings.master_key_provider, &settings, false).await?;
            let env_to_env =
                target == ProviderKind::Env && settings.master_key_provider == ProviderKind::Env;
            let to_provider = master_key::build(target, &settings, env_to_env).await?;
            let store = open_store(&settings).await?;
            let n = migrate_master_key(&store, from.as_ref(), to_provider.as_ref()).await?;
            store.close().await;
            eprintln!(
                "re-wrapped {n} root KEK(s) from `{}` to `{}`; start Keyward with KEYWARD_MASTER_KEY_PROVIDER={}{}",
                settings.master_key_provider.as_str(),
                target.as_str(),
                target.as_str(),
                if env_to_env { " and the new KEYWARD_MASTER_KEY" } else { "" }
            );
            Ok(())
        }
        MasterKeyCommand::RotateKek {
            batch_size,
            pause_ms,
            resume,
            config,
        } => {
            let settings = settings(&config)?;
            telemetry::init(settings.log_format, &settings.log_level);
            let provider =
                master_key::build(settings.master_key_provider, &settings, false).await?;
            let store = open_store(&settings).await?;
            let service = KeyService::new(store.clone(), provider, 1);
            service
                .load_root_keys()
                .await
                .context("cannot load the root key")?;
            if !resume {
                let kek = service.rotate_root_kek().await?;
                eprintln!("new root KEK {kek}; re-wrapping every key version under it");
            }
            let n = service
                .rewrap_retiring(
                    batch_size.max(1),
                    std::time::Duration::from_millis(pause_ms),
                    |done, total| {
                        eprintln!("re-wrapped {done}/{total}");
                    },
                )
                .await?;
            store.close().await;
            eprintln!("done: {n} key version(s) re-wrapped; old root KEKs retired");
            Ok(())
        }
        MasterKeyCommand::Status { json, config } => {
            let store = open_store(&settings(&config)?).await?;
            let keks = store.root_keks().await?;
            let counts = store.versions_per_kek().await?;
            store.close().await;
            let rows: Vec<_> = keks
                .iter()
                .map(|k| {
                    let n = counts.iter().find(|(id, _)| *id == k.id).map(|(_, n)| *n).unwrap_or(0);
                    json!({"kekId": k.id.to_string(), "state": k.state, "provider": k.provider, "versions": n})
                })
                .collect();
            if json {
                println!("{}", json!({"rootKeks": rows}));
            } else {
                for r in rows {
                    println!(
                        "{}  {:8}  provider={}  versions={}",
                        r["kekId"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        r["provider"].as_str().unwrap_or(""),
                        r["versions"]
                    );
                }
            }
            Ok(())
        }
    }
}

async fn job_command(command: JobCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    let (remote, job) = match &command {
        JobCommand::Start { remote, .. } => (remote.clone(), String::new()),
        JobCommand::Status { remote, job }
        | JobCommand::Watch { remote, job }
        | JobCommand::Cancel { remote, job } => (remote.clone(), job.clone()),
    };
    match command {
        JobCommand::Start {
            encryption_id,
            database_url,
            table,
            key_column,
            cipher_text_column,
            version_column,
            metadata_column,
            encryption_id_column,
            max_rows_per_second,
            json,
            ..
        } => {
            let mut source = json!({
                "databaseUrl": database_url,
                "table": table,
                "keyColumn": key_column,
                "cipherTextColumn": cipher_text_column,
                "versionColumn": version_column,
                "metadataColumn": metadata_column,
            });
            if let Some(c) = encryption_id_column {
                source["encryptionIdColumn"] = c.into();
            }
            let mut body = json!({"kind": "reencrypt", "source": source});
            if let Some(e) = encryption_id {
                body["encryptionId"] = e.into();
            }
            if let Some(n) = max_rows_per_second {
                body["maxRowsPerSecond"] = n.into();
            }
            let created = remote.call(Method::POST, "/v1/jobs", Some(&body)).await?;
            if json {
                println!("{created}");
            } else {
                println!("{}", created["jobId"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        JobCommand::Status { .. } => {
            let j = remote
                .call(Method::GET, &format!("/v1/jobs/{job}"), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&j)?);
            Ok(())
        }
        JobCommand::Cancel { .. } => {
            let j = remote
                .call(Method::POST, &format!("/v1/jobs/{job}/cancel"), None)
                .await?;
            eprintln!("job {job}: {}", j["state"].as_str().unwrap_or("?"));
            Ok(())
        }
        JobCommand::Watch { .. } => {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} rows  {msg}",
                )
                .expect("a valid template"),
            );
            loop {
                let j = remote
                    .call(Method::GET, &format!("/v1/jobs/{job}"), None)
                    .await?;
                bar.set_length(j["total"].as_u64().unwrap_or(0));
                bar.set_position(j["processed"].as_u64().unwrap_or(0));
                bar.set_message(format!(
                    "{}  {} rows/s  eta {}s  rewrapped {}  skipped {}  failed {}",
                    j["state"].as_str().unwrap_or("?"),
                    j["rowsPerSecond"],
                    j["etaSeconds"]
                        .as_i64()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "?".into()),
                    j["rewrapped"],
                    j["skipped"],
                    j["failed"],
                ));
                match j["state"].as_str() {
                    Some("succeeded") => {
                        bar.finish();
                        println!("{}", serde_json::to_string_pretty(&j)?);
                        return Ok(());
                    }
                    Some("failed") | Some("cancelled") => {
                        bar.abandon();
                        anyhow::bail!(
                            "job {job} {}: {}",
                            j["state"].as_str().unwrap_or(""),
                            j["error"].as_str().unwrap_or("")
                        );
                    }
                    _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
                }
            }
        }
    }
}

fn audit_verify(file: &std::path::Path, json_out: bool) -> anyhow::Result<()> {
    use crate::audit::{verify, VerifyError};
    let result = if file.as_os_str() == "-" {
        verify(std::io::stdin().lock())
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        verify(std::io::BufReader::new(f))
    };
    match result {
        Ok(report) => {
            if json_out {
                println!("{}", json!({"ok": true, "report": report}));
            } else {
                match (report.first_seq, report.last_seq) {
                    (Some(first), Some(last)) => println!(
                        "ok: {} records (seq {first} to {last}), every hash and link intact; last hash {}",
                        report.records,
                        report.last_hash.as_deref().unwrap_or("")
                    ),
                    _ => println!("ok: no records"),
                }
                if let Some(first) = report.first_seq.filter(|s| *s != 1) {
                    println!(
                        "note: the file starts mid-chain at seq {first} (after {}): earlier records are elsewhere (log rotation) or were removed",
                        report.starts_after.as_deref().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        Err(VerifyError::Broken(b)) => {
            if json_out {
                println!(
                    "{}",
                    json!({"ok": false, "line": b.line, "seq": b.seq, "reason": b.reason})
                );
            }
            anyhow::bail!("{}: broken at {b}", file.display())
        }
        Err(e @ VerifyError::Io(_)) => Err(anyhow::anyhow!("{}: {e}", file.display())),
    }
}
