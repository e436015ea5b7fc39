//! `keyward job`: re-encryption jobs on a running Keyward, over its API (not
//! its database), so they run where the key ring and the job runner are.

use reqwest::Method;
use serde_json::json;

use crate::client::Remote;

/// The `job` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum JobCommand {
    /// Start a job that moves a table's ciphertexts to the active version.
    Start {
        #[command(flatten)]
        job: StartArgs,
        /// Print the job id as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show a job.
    Status {
        /// The job id.
        job: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Follow a job with a live progress bar until it ends.
    Watch {
        /// The job id.
        job: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel a job.
    Cancel {
        /// The job id.
        job: String,
        #[command(flatten)]
        remote: Remote,
    },
}

/// The job to start: which encryption, which table and columns, how fast.
#[derive(Debug, clap::Args)]
pub(super) struct StartArgs {
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
}

/// Runs a `job` subcommand.
pub(super) async fn run(command: JobCommand) -> anyhow::Result<()> {
    match command {
        JobCommand::Start { job, json, remote } => start(&remote, job, json).await,
        JobCommand::Status { job, remote } => {
            let j = remote
                .call(Method::GET, &format!("/v1/jobs/{job}"), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&j)?);
            Ok(())
        }
        JobCommand::Cancel { job, remote } => {
            let j = remote
                .call(Method::POST, &format!("/v1/jobs/{job}/cancel"), None)
                .await?;
            eprintln!("job {job}: {}", j["state"].as_str().unwrap_or("?"));
            Ok(())
        }
        JobCommand::Watch { job, remote } => watch(&remote, &job).await,
    }
}

async fn start(remote: &Remote, job: StartArgs, json: bool) -> anyhow::Result<()> {
    let mut source = json!({
        "databaseUrl": job.database_url,
        "table": job.table,
        "keyColumn": job.key_column,
        "cipherTextColumn": job.cipher_text_column,
        "versionColumn": job.version_column,
        "metadataColumn": job.metadata_column,
    });
    if let Some(c) = job.encryption_id_column {
        source["encryptionIdColumn"] = c.into();
    }
    let mut body = json!({"kind": "reencrypt", "source": source});
    if let Some(e) = job.encryption_id {
        body["encryptionId"] = e.into();
    }
    if let Some(n) = job.max_rows_per_second {
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

async fn watch(remote: &Remote, job: &str) -> anyhow::Result<()> {
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
