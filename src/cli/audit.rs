//! `keyward audit`: checking an audit file offline, with no server and no
//! database (the file's hash chain is self-contained).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use crate::audit::{verify, VerifyError};

/// The `audit` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum AuditCommand {
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

/// Runs an `audit` subcommand.
pub(super) fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { file, json } => verify_file(&file, json),
    }
}

fn verify_file(file: &Path, json_out: bool) -> anyhow::Result<()> {
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
