//! Signed checkpoints in the audit file: `keyward audit verify` on a file a
//! real server wrote passes with the server's public keys, and names a chain
//! rewritten by someone who recomputed every SHA-256, a cut head, a cut tail
//! and records appended after the last checkpoint, each with its own exit
//! status.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::helpers::{keyward_command, Backend, TestApp};
use crate::on_both_databases;

/// `keyward audit verify FILE` with `keys` as trusted public keys: exit
/// status, standard output, standard error.
fn verify(path: &Path, keys: &[String]) -> (i32, String, String) {
    let mut command = keyward_command();
    command.args(["audit", "verify", path.to_str().unwrap()]);
    for key in keys {
        command.args(["--public-key", key]);
    }
    let out = command.output().unwrap();
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The checkpoint public keys `keyward audit public-keys` lists.
pub fn public_keys(app: &TestApp) -> Vec<String> {
    let out = app.cli(&["audit", "public-keys"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

fn is_checkpoint(line: &str) -> bool {
    line.starts_with("{\"checkpoint\":")
}

/// What an attacker with write access to the file but without the key
/// does: edits the record with `seq`, then recomputes the unkeyed chain from
/// there on (format v2: each `h` is the SHA-256 of the previous record's
/// hash followed by the line up to its `prev` and `h`, closed with `}`),
/// keeping every other line as it is.
fn rewrite_chain(lines: &[String], seq: u64, edit: impl Fn(&str) -> String) -> Vec<String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut prev: Option<Vec<u8>> = None;
    lines
        .iter()
        .map(|line| {
            if is_checkpoint(line) {
                return line.clone();
            }
            assert!(line.starts_with("{\"v\":2,"), "{line}");
            let record: Value = serde_json::from_str(line).unwrap();
            let old_hash = record["h"].as_str().unwrap().to_string();
            let stated = record["prev"]
                .as_str()
                .map(|p| format!(",\"prev\":\"{p}\""));
            let mut text = line.clone();
            if record["seq"] == seq {
                text = edit(&text);
            }
            let body = text
                .strip_suffix(&format!(",\"h\":\"{old_hash}\"}}"))
                .unwrap();
            let body = match &stated {
                Some(s) => body.strip_suffix(s.as_str()).unwrap(),
                None => body,
            };
            let follows = match (&prev, &record["prev"]) {
                (Some(p), _) => p.clone(),
                (None, p) => b64.decode(p.as_str().unwrap()).unwrap(),
            };
            let mut hashed = follows;
            hashed.extend_from_slice(format!("{body}}}").as_bytes());
            let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &hashed);
            prev = Some(hash.as_ref().to_vec());
            format!(
                "{body}{},\"h\":\"{}\"}}",
                stated.unwrap_or_default(),
                b64.encode(hash.as_ref())
            )
        })
        .collect()
}

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

async fn audit_verify_names_a_rewritten_chain_a_cut_head_a_cut_tail_and_uncovered_records(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let mut app = TestApp::spawn_with(
        backend,
        &[
            ("KEYWARD_AUDIT_FILE", file.to_str().unwrap()),
            ("KEYWARD_AUDIT_CHECKPOINT_RECORDS", "4"),
            ("KEYWARD_AUDIT_CHECKPOINT_INTERVAL", "1h"),
        ],
    )
    .await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    for i in 0..5 {
        app.encrypt(&creds, &enc, &format!("a{i}")).await;
    }
    // A root-KEK rotation changes the signing key; the old one keeps
    // verifying what it signed.
    let operator = app.create_operator();
    let (status, body) = app
        .post(
            "/v1/admin/root-kek/rotate",
            &operator,
            &serde_json::json!({}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    for i in 0..4 {
        app.encrypt(&creds, &enc, &format!("b{i}")).await;
    }
    app.stop(); // SIGTERM: the last records and a closing checkpoint.

    let keys = public_keys(&app);
    assert_eq!(keys.len(), 2, "{keys:?}");
    let log = app.log_text();
    assert!(
        log.contains(&keys[0]) && log.contains(&keys[1]),
        "the keys in use are logged"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let records = lines.iter().filter(|l| !is_checkpoint(l)).count();
    assert_eq!(records, 11, "{text}"); // create, 5 encrypts, rotate, 4 encrypts
                                       // Where the checkpoints are (records reach the writer in batches, so a
                                       // checkpoint may come after more than 4).
    let covered: Vec<u64> = lines
        .iter()
        .filter(|l| is_checkpoint(l))
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["checkpoint"]["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(covered.len() >= 2, "{text}");
    // The file ends with a checkpoint covering the last record (at
    // shutdown, unless the record count made one due just before).
    assert!(is_checkpoint(lines.last().unwrap()), "{text}");
    assert_eq!(covered.last(), Some(&11));

    // Untouched: verified with the public keys; not without them.
    let (code, stdout, stderr) = verify(&file, &keys);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.starts_with("ok: 11 records"), "{stdout}");
    let (code, _, stderr) = verify(&file, &[]);
    assert_eq!(code, 6, "{stderr}");
    assert!(stderr.contains("signatures not checked"), "{stderr}");
    // Only the newer key: the older one's checkpoints are not trusted.
    let (code, _, stderr) = verify(&file, &keys[1..]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("not one of the trusted public keys"),
        "{stderr}"
    );

    // Rewritten, chain recomputed with SHA-256: the unkeyed chain holds, the
    // signatures do not.
    let rewritten = rewrite_chain(&lines, 3, |l| l.replace("\"st\":200", "\"st\":500"));
    assert_ne!(rewritten, lines);
    let path = write(dir.path(), "rewritten.jsonl", &rewritten);
    let (code, _, stderr) = verify(&path, &keys);
    assert_eq!(code, 1, "{stderr}");
    let first = covered[0];
    assert!(
        stderr.contains(&format!(
            "records 1..{first} were rewritten after they were signed"
        )),
        "{stderr}"
    );
    // Rewritten and every checkpoint dropped: nothing is verified.
    let bare: Vec<String> = rewritten
        .iter()
        .filter(|l| !is_checkpoint(l))
        .cloned()
        .collect();
    let (code, _, stderr) = verify(&write(dir.path(), "bare.jsonl", &bare), &keys);
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("records 1..11"), "{stderr}");

    // Head cut: the first two records gone.
    let (code, _, stderr) = verify(&write(dir.path(), "head.jsonl", &lines[2..]), &keys);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("line 1 (seq 3): records 1..2 are missing before the first record"),
        "{stderr}"
    );

    // Tail cut, the last checkpoint kept: it covers a record that is gone.
    let closing = lines.len() - 1;
    let mut cut = lines[..closing - 1].to_vec();
    cut.push(lines[closing].clone());
    let (code, _, stderr) = verify(&write(dir.path(), "tail.jsonl", &cut), &keys);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("records 11..11 are missing, the file was cut"),
        "{stderr}"
    );
    // Tail cut with the last checkpoint: what is left after the checkpoint
    // before it is reported as not covered.
    let (code, _, stderr) = verify(&write(dir.path(), "tail2.jsonl", &lines[..closing]), &keys);
    assert_eq!(code, 5, "{stderr}");
    assert!(
        stderr.contains("..11 (from line") && stderr.contains("not covered by a checkpoint"),
        "{stderr}"
    );

    // Records appended after the last checkpoint, chained as the writer
    // would: not covered, so not verified.
    let mut appended = lines.clone();
    let template = lines[closing - 1].clone();
    let last_record: Value = serde_json::from_str(&template).unwrap();
    // (Format v2: the record before it is not named on the line; the
    // rechaining below hashes it in.)
    assert!(last_record["prev"].is_null(), "{template}");
    let forged = template.replace(&format!("\"seq\":{},", last_record["seq"]), "\"seq\":12,");
    appended.push(forged);
    let appended = rewrite_chain(&appended, 0, |l| l.to_string());
    let path = write(dir.path(), "appended.jsonl", &appended);
    let (code, _, stderr) = verify(&path, &keys);
    assert_eq!(code, 5, "{stderr}");
    assert!(
        stderr.contains("records 12..12") && stderr.contains("not covered by a checkpoint"),
        "{stderr}"
    );
}

on_both_databases!(
    audit_verify_names_a_rewritten_chain_a_cut_head_a_cut_tail_and_uncovered_records
);
