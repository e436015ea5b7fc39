//! Files of any size (issue #20): `keyward encrypt-file` / `decrypt-file`
//! seal a file in Keyward's stream format under a data key from the
//! server's data-key routes, so the file's bytes never cross the network and
//! the server's memory does not grow with the file; a damaged file is
//! refused and leaves no output.

use std::io::{Read, Write};
use std::path::Path;

use crate::helpers::{keyward_command, Backend, Creds, TestApp};
use aws_lc_rs::digest::{Context, SHA256};

crate::on_both_databases!(
    a_one_gib_file_round_trips_through_the_cli_with_the_server_under_64_mib,
    the_cli_refuses_a_damaged_file_and_leaves_no_output,
);

/// The server's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn cli(app: &TestApp, creds: &Creds, args: &[&str]) -> std::process::Output {
    keyward_command()
        .args(args)
        .env("KEYWARD_URL", app.url(""))
        .env("KEYWARD_API_KEY", &creds.key)
        .env("KEYWARD_API_SECRET", &creds.secret)
        .output()
        .unwrap()
}

/// Writes `size` bytes of a repeating, position-dependent pattern; returns
/// their SHA-256.
fn write_pattern(path: &Path, size: u64) -> Vec<u8> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut digest = Context::new(&SHA256);
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let mut n = 0u32;
    while written < size {
        for (i, b) in block.iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(31).wrapping_add(n) as u8;
        }
        let take = (size - written).min(block.len() as u64) as usize;
        file.write_all(&block[..take]).unwrap();
        digest.update(&block[..take]);
        written += take as u64;
        n += 1;
    }
    file.flush().unwrap();
    digest.finish().as_ref().to_vec()
}

fn sha256_file(path: &Path) -> Vec<u8> {
    let mut file = std::fs::File::open(path).unwrap();
    let mut digest = Context::new(&SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
    }
    digest.finish().as_ref().to_vec()
}

async fn a_one_gib_file_round_trips_through_the_cli_with_the_server_under_64_mib(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let dir = tempfile::tempdir().unwrap();
    let (plain, sealed, opened) = (
        dir.path().join("plain"),
        dir.path().join("sealed"),
        dir.path().join("opened"),
    );
    const SIZE: u64 = 1 << 30;
    let want = write_pattern(&plain, SIZE);
    let out = cli(
        &app,
        &creds,
        &[
            "encrypt-file",
            plain.to_str().unwrap(),
            sealed.to_str().unwrap(),
            "--encryption-id",
            &enc,
            "--context",
            "backups/2026-12-06",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&plain).unwrap();
    // 64 KiB chunks: a 16-byte tag each, and the header.
    let len = std::fs::metadata(&sealed).unwrap().len();
    assert!(
        len > SIZE + (SIZE >> 16) * 16 && len < SIZE + (SIZE >> 16) * 16 + 300,
        "{len}"
    );
    let out = cli(
        &app,
        &creds,
        &[
            "decrypt-file",
            sealed.to_str().unwrap(),
            opened.to_str().unwrap(),
            "--context",
            "backups/2026-12-06",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_file(&opened), want);
    // The wrong context unwraps no key.
    let out = cli(
        &app,
        &creds,
        &[
            "decrypt-file",
            sealed.to_str().unwrap(),
            dir.path().join("x").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("decryption_failed"));
    assert!(!dir.path().join("x").exists());
    let peak = peak_rss_kib(app.pid());
    assert!(peak < 64 * 1024, "the server's peak RSS was {peak} KiB");
    eprintln!("server peak RSS during a 1 GiB CLI round trip: {peak} KiB");
}

async fn the_cli_refuses_a_damaged_file_and_leaves_no_output(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    let sealed = dir.path().join("sealed");
    write_pattern(&plain, 5 * 1024 + 10);
    let out = cli(
        &app,
        &creds,
        &[
            "encrypt-file",
            plain.to_str().unwrap(),
            sealed.to_str().unwrap(),
            "--encryption-id",
            &enc,
            "--chunk-size",
            "1024",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&sealed).unwrap();
    let header = bytes.len() - (5 * 1024 + 10) - 6 * 16;
    let chunk = 1024 + 16;
    let chunks: Vec<&[u8]> = bytes[header..].chunks(chunk).collect();
    let with = |parts: Vec<&[u8]>| -> Vec<u8> {
        let mut out = bytes[..header].to_vec();
        for p in parts {
            out.extend_from_slice(p);
        }
        out
    };
    let mut damaged: Vec<(String, Vec<u8>)> = vec![
        (
            "swapped".into(),
            with(vec![
                chunks[1], chunks[0], chunks[2], chunks[3], chunks[4], chunks[5],
            ]),
        ),
        (
            "duplicated".into(),
            with(vec![
                chunks[0], chunks[0], chunks[1], chunks[2], chunks[3], chunks[4], chunks[5],
            ]),
        ),
        (
            "dropped".into(),
            with(vec![chunks[0], chunks[2], chunks[3], chunks[4], chunks[5]]),
        ),
        (
            "extended".into(),
            with(vec![
                chunks[0], chunks[1], chunks[2], chunks[3], chunks[4], chunks[5], chunks[5],
            ]),
        ),
    ];
    for k in 0..chunks.len() {
        damaged.push((format!("cut after {k} chunks"), with(chunks[..k].to_vec())));
    }
    let mut flipped = bytes.clone();
    flipped[header + 3000] ^= 1;
    damaged.push(("flipped".into(), flipped));
    for (what, bytes) in damaged {
        let input = dir.path().join("damaged");
        let output = dir.path().join("out");
        std::fs::write(&input, &bytes).unwrap();
        let out = cli(
            &app,
            &creds,
            &[
                "decrypt-file",
                input.to_str().unwrap(),
                output.to_str().unwrap(),
            ],
        );
        assert!(!out.status.success(), "{what} decrypted");
        assert!(!output.exists(), "{what}: output left behind");
        assert!(
            !dir.path().join("out.partial").exists(),
            "{what}: partial output left behind"
        );
    }
    // Intact, it decrypts.
    let output = dir.path().join("out");
    let out = cli(
        &app,
        &creds,
        &[
            "decrypt-file",
            sealed.to_str().unwrap(),
            output.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&output).unwrap(),
        std::fs::read(&plain).unwrap()
    );
}
