//! `keyward job`: re-encryption jobs on a running Keyward, over its API (not
//! its database), so they run where the key ring and the job runner are.

use anyhow::Context;
use reqwest::Method;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::client::{Remote, NO_BODY};

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
    /// The job source: a name the operator registered (`job_sources_file`)
    /// and granted to this tenant.
    #[arg(long)]
    source: String,
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
        JobCommand::Start { job, json, remote } => start(&remote, &job, json).await,
        JobCommand::Status { job, remote } => {
            // Printed as Keyward sent it: every field, including ones newer
            // than this CLI.
            let view: Value = remote.call(Method::GET, &job_path(&job), NO_BODY).await?;
            println!("{}", serde_json::to_string_pretty(&view)?);
            Ok(())
        }
        JobCommand::Cancel { job, remote } => {
            let path = format!("{}/cancel", job_path(&job));
            let view: JobState = remote.call(Method::POST, &path, NO_BODY).await?;
            eprintln!("job {job}: {}", view.state);
            Ok(())
        }
        JobCommand::Watch { job, remote } => watch(&remote, &job).await,
    }
}

/// `POST /v1/jobs` input (the API's `CreateJobRequest`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreateJob<'a> {
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_rows_per_second: Option<u32>,
    source: JobSource<'a>,
}

/// Where the ciphertexts are (the API's `JobSource`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JobSource<'a> {
    name: &'a str,
    table: &'a str,
    key_column: &'a str,
    cipher_text_column: &'a str,
    version_column: &'a str,
    metadata_column: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption_id_column: Option<&'a str>,
}

/// `POST /v1/jobs` output; `--json` prints it back.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobCreated {
    job_id: String,
}

/// The state alone of a job's view (`POST /v1/jobs/{id}/cancel`).
#[derive(Deserialize)]
struct JobState {
    state: String,
}

/// The fields of a job's view (`GET /v1/jobs/{id}`) that the progress bar
/// shows. Nullable fields must still be present: a renamed one is an error,
/// not a silent blank.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobProgress {
    state: String,
    processed: u64,
    #[serde(deserialize_with = "present")]
    total: Option<u64>,
    rewrapped: i64,
    skipped: i64,
    failed: i64,
    rows_per_second: i64,
    #[serde(deserialize_with = "present")]
    eta_seconds: Option<i64>,
    #[serde(deserialize_with = "present")]
    error: Option<String>,
}

/// A nullable field that may not be left out (serde lets a missing `Option`
/// default to `None` unless the field has its own deserializer).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::deserialize(d)
}

fn job_path(job: &str) -> String {
    format!("/v1/jobs/{job}")
}

async fn start(remote: &Remote, job: &StartArgs, json: bool) -> anyhow::Result<()> {
    let request = CreateJob {
        kind: "reencrypt",
        encryption_id: job.encryption_id.as_deref(),
        max_rows_per_second: job.max_rows_per_second,
        source: JobSource {
            name: &job.source,
            table: &job.table,
            key_column: &job.key_column,
            cipher_text_column: &job.cipher_text_column,
            version_column: &job.version_column,
            metadata_column: &job.metadata_column,
            encryption_id_column: job.encryption_id_column.as_deref(),
        },
    };
    let created: JobCreated = remote
        .call(Method::POST, "/v1/jobs", Some(&request))
        .await?;
    if json {
        println!("{}", serde_json::to_string(&created)?);
    } else {
        println!("{}", created.job_id);
    }
    Ok(())
}

async fn watch(remote: &Remote, job: &str) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} rows  {msg}",
        )
        .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?,
    );
    loop {
        // Kept whole to print at the end as Keyward sent it (like `status`).
        let view: Value = remote.call(Method::GET, &job_path(job), NO_BODY).await?;
        let p = JobProgress::deserialize(&view)
            .with_context(|| format!("Keyward's view of job {job} is not the expected one"))?;
        bar.set_length(p.total.unwrap_or(0));
        bar.set_position(p.processed);
        bar.set_message(format!(
            "{}  {} rows/s  eta {}s  rewrapped {}  skipped {}  failed {}",
            p.state,
            p.rows_per_second,
            p.eta_seconds
                .map(|s| s.to_string())
                .unwrap_or_else(|| "?".into()),
            p.rewrapped,
            p.skipped,
            p.failed,
        ));
        match p.state.as_str() {
            "succeeded" => {
                bar.finish();
                println!("{}", serde_json::to_string_pretty(&view)?);
                return Ok(());
            }
            "failed" | "cancelled" => {
                bar.abandon();
                anyhow::bail!(
                    "job {job} {}: {}",
                    p.state,
                    p.error.as_deref().unwrap_or("")
                );
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::{CreateJob, JobProgress, JobSource};

    fn view() -> serde_json::Value {
        json!({
            "jobId": "5f0c6b9e-8a44-4d0e-9a43-3d2b0a9c1e11", "kind": "reencrypt",
            "state": "running", "encryptionId": null, "processed": 120, "total": 500,
            "rewrapped": 100, "skipped": 15, "failed": 5, "rowsPerSecond": 40,
            "etaSeconds": 9, "remainingByVersion": {}, "maxRowsPerSecond": null,
            "error": null, "source": null, "createdAt": "2025-01-01T00:00:00Z",
            "startedAt": null, "finishedAt": null,
        })
    }

    #[test]
    fn a_job_view_decodes_into_its_progress() {
        let p = JobProgress::deserialize(&view()).unwrap();
        assert_eq!(
            (p.state.as_str(), p.processed, p.total),
            ("running", 120, Some(500))
        );
        assert_eq!((p.rewrapped, p.skipped, p.failed), (100, 15, 5));
        assert_eq!(
            (p.rows_per_second, p.eta_seconds, p.error),
            (40, Some(9), None)
        );
    }

    #[test]
    fn a_missing_nullable_field_is_an_error_not_a_blank() {
        for field in ["total", "etaSeconds", "error"] {
            let mut v = view();
            v.as_object_mut().unwrap().remove(field);
            let e = JobProgress::deserialize(&v).err().expect(field).to_string();
            assert!(e.contains(&format!("missing field `{field}`")), "{e}");
        }
    }

    #[test]
    fn a_create_request_leaves_out_what_was_not_given() {
        let request = CreateJob {
            kind: "reencrypt",
            encryption_id: None,
            max_rows_per_second: Some(10),
            source: JobSource {
                name: "billing",
                table: "t",
                key_column: "id",
                cipher_text_column: "ct",
                version_column: "v",
                metadata_column: "m",
                encryption_id_column: Some("enc"),
            },
        };
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            json!({"kind": "reencrypt", "maxRowsPerSecond": 10, "source": {
                "name": "billing", "table": "t", "keyColumn": "id",
                "cipherTextColumn": "ct", "versionColumn": "v", "metadataColumn": "m",
                "encryptionIdColumn": "enc",
            }})
        );
    }
}
