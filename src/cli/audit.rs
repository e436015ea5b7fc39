//! `keyward audit`: checking an audit file offline, with no server, no
//! database and no secret (the file's hash chain is self-contained, and its
//! checkpoints verify with public keys), and listing those public keys.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use super::config_arg::ConfigArg;
use super::exit::ExitWith;
use crate::audit::{verify, verify_files, BreakKind, VerifyError, VerifyReport};
use crate::crypto::{checkpoint_key_id, parse_hex, CHECKPOINT_PUBLIC_KEY_LEN};
use crate::startup::open_store;

/// `audit verify`'s exit status when a record or checkpoint was changed,
/// forged, removed, inserted or reordered.
pub const EXIT_TAMPERED: u8 = 1;
/// Cannot read the file, or bad arguments (as clap's own usage errors).
pub const EXIT_UNREADABLE: u8 = 2;
/// Records are missing before the file's first record.
pub const EXIT_HEAD_CUT: u8 = 3;
/// Records a checkpoint covers are missing before it.
pub const EXIT_TAIL_CUT: u8 = 4;
/// Intact, but records after the last checkpoint are not covered by one.
pub const EXIT_UNCOVERED: u8 = 5;
/// Intact chain, but no trusted public key was given: signatures not checked.
pub const EXIT_UNSIGNED: u8 = 6;

/// The `audit` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum AuditCommand {
    /// Check an audit file: every record's hash and link, and every signed
    /// checkpoint. Exit 0: intact and covered by checkpoints signed by a
    /// trusted key; 1: tampered; 2: unreadable; 3: head cut; 4: tail cut;
    /// 5: records after the last checkpoint not covered; 6: no trusted key
    /// given, signatures not checked.
    Verify {
        /// The audit file (KEYWARD_AUDIT_FILE), or `-` for standard input;
        /// or several: the file and those it was rotated to (`FILE.*`),
        /// checked as one chain, in any order.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// A trusted checkpoint public key, hex (repeatable); `keyward audit
        /// public-keys` lists them.
        #[arg(long = "public-key", value_name = "HEX")]
        public_keys: Vec<String>,
        /// A file of trusted public keys: the first word of each line that
        /// is not empty or a `#` comment (what `keyward audit public-keys`
        /// prints).
        #[arg(long = "public-keys", value_name = "FILE")]
        public_keys_file: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the public keys that verify audit checkpoints (one per root KEK
    /// that has signed any, retired ones included), from the database: no
    /// secret is needed or shown.
    PublicKeys {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of one `PUBLIC_KEY KEY_ID CREATED` line per key.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an `audit` subcommand.
pub(super) async fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify {
            files,
            public_keys,
            public_keys_file,
            json,
        } => {
            let trusted = trusted_keys(&public_keys, public_keys_file.as_deref())
                .map_err(|e| ExitWith::new(EXIT_UNREADABLE, format!("{e:#}")))?;
            verify_file(&files, &trusted, json)
        }
        AuditCommand::PublicKeys { config, json } => public_keys(&config, json).await,
    }
}

/// The trusted keys from `--public-key` and `--public-keys`.
fn trusted_keys(
    given: &[String],
    file: Option<&Path>,
) -> anyhow::Result<Vec<[u8; CHECKPOINT_PUBLIC_KEY_LEN]>> {
    let mut words: Vec<String> = given.to_vec();
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        words.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(|l| l.split_whitespace().next().map(str::to_string)),
        );
    }
    words
        .iter()
        .map(|word| {
            parse_hex(word)
                .and_then(|k| <[u8; CHECKPOINT_PUBLIC_KEY_LEN]>::try_from(k).ok())
                .with_context(|| {
                    format!("not a public key (64 lower-case hex characters): {word:?}")
                })
        })
        .collect()
}

fn verify_file(
    files: &[PathBuf],
    trusted: &[[u8; CHECKPOINT_PUBLIC_KEY_LEN]],
    json_out: bool,
) -> anyhow::Result<()> {
    let mut inputs: Vec<(String, Box<dyn std::io::BufRead>)> = Vec::with_capacity(files.len());
    for file in files {
        let name = file.display().to_string();
        if file.as_os_str() == "-" {
            inputs.push((name, Box::new(std::io::stdin().lock())));
            continue;
        }
        let f = std::fs::File::open(file)
            .map_err(|e| ExitWith::new(EXIT_UNREADABLE, format!("cannot open {name}: {e}")))?;
        inputs.push((name, Box::new(std::io::BufReader::new(f))));
    }
    let all = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let (name, result) = match (inputs.len(), inputs.pop()) {
        (1, Some((name, input))) => (name, verify(input, trusted)),
        (_, last) => {
            inputs.extend(last);
            match verify_files(inputs, trusted) {
                Ok(report) => (all, Ok(report)),
                Err((name, e)) => (name, Err(e)),
            }
        }
    };
    match result {
        Ok(report) => {
            let (code, outcome) = outcome_of(&report);
            if json_out {
                println!(
                    "{}",
                    json!({"ok": code == 0, "outcome": outcome, "report": report})
                );
            } else {
                print_report(&report);
            }
            match code {
                0 => Ok(()),
                EXIT_UNCOVERED => {
                    let (from, to) = report.uncovered.unwrap_or_default();
                    Err(ExitWith::new(code, format!(
                        "{name}: records {from}..{to} (from line {}) come after the last checkpoint: not covered by a checkpoint, so not verified (the file is still being written, the writer stopped without its closing checkpoint, or they were appended by someone else)",
                        report.uncovered_from_line.unwrap_or(0)
                    ))
                    .into())
                }
                _ => Err(ExitWith::new(code, format!(
                    "{name}: checkpoint signatures not checked: no trusted public key given (--public-key or --public-keys); the chain alone does not show a file rewritten with recomputed hashes"
                ))
                .into()),
            }
        }
        Err(VerifyError::Broken(b)) => {
            let (code, outcome) = match b.kind {
                BreakKind::Tampered => (EXIT_TAMPERED, "tampered"),
                BreakKind::HeadCut => (EXIT_HEAD_CUT, "head_cut"),
                BreakKind::TailCut => (EXIT_TAIL_CUT, "tail_cut"),
            };
            if json_out {
                println!(
                    "{}",
                    json!({"ok": false, "outcome": outcome, "line": b.line, "seq": b.seq, "reason": b.reason})
                );
            }
            Err(ExitWith::new(code, format!("{name}: broken at {b}")).into())
        }
        Err(e @ VerifyError::Io(_)) => {
            Err(ExitWith::new(EXIT_UNREADABLE, format!("{name}: {e}")).into())
        }
    }
}

/// The exit status and outcome name of a file that shows no break.
fn outcome_of(report: &VerifyReport) -> (u8, &'static str) {
    if report.records == 0 {
        (0, "verified")
    } else if !report.signatures_checked {
        (EXIT_UNSIGNED, "signatures_not_checked")
    } else if report.uncovered.is_some() {
        (EXIT_UNCOVERED, "not_covered")
    } else {
        (0, "verified")
    }
}

fn print_report(report: &VerifyReport) {
    match (report.first_seq, report.last_seq) {
        (Some(first), Some(last)) => println!(
            "ok: {} records (seq {first} to {last}), every hash and link intact; last hash {}",
            report.records,
            report.last_hash.as_deref().unwrap_or("")
        ),
        _ => println!("ok: no records"),
    }
    if let Some(to) = report.covered_to {
        println!(
            "{} checkpoint(s) {} by key(s) {}; records up to seq {to} covered",
            report.checkpoints,
            if report.signatures_checked {
                "signed"
            } else {
                "(signatures not checked)"
            },
            report.key_ids.join(", ")
        );
    }
    if let Some(first) = report.first_seq.filter(|s| *s != 1) {
        println!(
            "note: the file starts mid-chain at seq {first} (after {}), where a checkpoint says it starts (log rotation)",
            report.starts_after.as_deref().unwrap_or("")
        );
    }
}

async fn public_keys(config: &ConfigArg, json_out: bool) -> anyhow::Result<()> {
    let store = open_store(&config.settings()?).await?;
    let keys = store.checkpoint_keys().await;
    store.close().await;
    let keys = keys.context("cannot read the checkpoint keys")?;
    // Listed only if each is what its id says (a row edited in the database
    // would otherwise be trusted by whoever copies this), in both formats.
    for k in &keys {
        let consistent = parse_hex(&k.public_key)
            .and_then(|p| <[u8; CHECKPOINT_PUBLIC_KEY_LEN]>::try_from(p).ok())
            .is_some_and(|p| checkpoint_key_id(&p) == k.key_id);
        if !consistent {
            anyhow::bail!(
                "checkpoint key {} does not match its public key in the database",
                k.key_id
            );
        }
    }
    if json_out {
        let list: Vec<_> = keys
            .iter()
            .map(|k| {
                json!({
                    "keyId": k.key_id,
                    "publicKey": k.public_key,
                    "kekId": k.kek_id,
                    "createdAt": crate::domain::time::rfc3339(k.created_at),
                })
            })
            .collect();
        println!("{}", json!({ "keys": list }));
        return Ok(());
    }
    for k in &keys {
        println!(
            "{} {} {}",
            k.public_key,
            k.key_id,
            crate::domain::time::rfc3339(k.created_at)
        );
    }
    Ok(())
}
