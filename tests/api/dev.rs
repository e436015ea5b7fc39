//! `keyward dev`: no setup, working curl examples, keys kept across restarts.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{keyward_command, signal};

struct Dev {
    child: Child,
    stdout: String,
    creds: Value,
}

fn start_dev(data_dir: &Path, creds_file: &Path) -> Dev {
    start_dev_with(data_dir, creds_file, &[])
}

fn start_dev_with(data_dir: &Path, creds_file: &Path, extra: &[&str]) -> Dev {
    let _ = std::fs::remove_file(creds_file);
    let mut child = keyward_command()
        .args(["dev", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--credentials-out")
        .arg(creds_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !creds_file.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("keyward dev exited with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "keyward dev did not write its credentials"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let creds: Value = serde_json::from_slice(&std::fs::read(creds_file).unwrap()).unwrap();
    // The banner is printed before the credentials file is written.
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = stdout.read(&mut buf).unwrap();
    Dev {
        child,
        stdout: String::from_utf8_lossy(&buf[..n]).into_owned(),
        creds,
    }
}

fn stop_dev(mut dev: Dev) {
    signal(&dev.child, "TERM");
    let status = dev.child.wait().unwrap();
    assert!(status.success(), "keyward dev exited with {status}");
}

/// The shell command printed under `heading` in the banner.
fn example(banner: &str, heading: &str) -> String {
    let start = banner
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading} in:\n{banner}"));
    banner[start + heading.len()..]
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn paste(command: &str) -> Value {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{command}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{command} printed {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn dev_mode_prints_examples_that_work_when_pasted_and_keeps_keys_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let creds_file = dir.path().join("creds.json");

    let dev = start_dev(&data, &creds_file);
    let mut fields: Vec<&str> = dev
        .creds
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "apiKey",
            "apiSecret",
            "encryptionId",
            "operatorApiKey",
            "operatorApiSecret",
            "tenantId"
        ]
    );
    assert!(dev.stdout.contains("DEV MODE"), "{}", dev.stdout);
    assert!(dev.stdout.contains("master.key"));

    let encrypted = paste(&example(&dev.stdout, "Encrypt:"));
    assert_eq!(encrypted["encryptionId"], dev.creds["encryptionId"]);
    assert_eq!(
        paste(&example(&dev.stdout, "Decrypt")),
        serde_json::json!({"data": "hello, keyward"})
    );
    let rotated = paste(&example(&dev.stdout, "Rotate:"));
    assert!(rotated["newVersionId"].is_string());
    let details = paste(&example(&dev.stdout, "Inspect:"));
    assert_eq!(details["versions"].as_array().unwrap().len(), 2);
    // The operator key lists tenants and is refused on a tenant's data.
    let tenants = paste(&example(&dev.stdout, "Tenants (operator key):"));
    assert_eq!(tenants["items"][0]["tenantId"], dev.creds["tenantId"]);
    let inspect = example(&dev.stdout, "Inspect:")
        .replace(
            dev.creds["apiKey"].as_str().unwrap(),
            dev.creds["operatorApiKey"].as_str().unwrap(),
        )
        .replace(
            dev.creds["apiSecret"].as_str().unwrap(),
            dev.creds["operatorApiSecret"].as_str().unwrap(),
        );
    assert_eq!(paste(&inspect)["error"]["code"], "tenant_key_required");
    let first_creds = dev.creds.clone();
    stop_dev(dev);

    // Same folder: same credentials, and the first run's ciphertext still decrypts.
    let dev = start_dev(&data, &creds_file);
    assert_eq!(dev.creds, first_creds);
    let decrypt = example(&dev.stdout, "Decrypt");
    let body = serde_json::json!({
        "encryptionId": encrypted["encryptionId"],
        "cipherText": encrypted["cipherText"],
        "encryptionVersionId": encrypted["encryptionVersionId"],
        "metadata": encrypted["metadata"],
    });
    // Reuse the printed command's URL and headers with the first run's ciphertext.
    let command = format!(
        "{} -d '{}'",
        decrypt
            .split(" -d ")
            .next()
            .unwrap()
            .trim_end_matches(['\\', ' ', '\n']),
        body
    );
    assert_eq!(
        paste(&command),
        serde_json::json!({"data": "hello, keyward"})
    );
    stop_dev(dev);

    assert!(data.join("master.key").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("master.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the dev master key is private to its owner"
        );
    }
}

#[test]
fn dev_mode_with_tls_serves_mutual_tls_and_its_examples_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let creds_file = dir.path().join("creds.json");
    let dev = start_dev_with(&data, &creds_file, &["--tls"]);
    let encrypt = example(&dev.stdout, "Encrypt:");
    assert!(
        encrypt.contains("https://localhost:") && encrypt.contains("--cert"),
        "{encrypt}"
    );
    let encrypted = paste(&encrypt);
    assert_eq!(encrypted["encryptionId"], dev.creds["encryptionId"]);
    assert_eq!(
        paste(&example(&dev.stdout, "Decrypt")),
        serde_json::json!({"data": "hello, keyward"})
    );
    assert!(paste(&example(&dev.stdout, "Rotate:"))["newVersionId"].is_string());
    // Without the client certificate the handshake fails.
    let plain = encrypt
        .replace(" --cert ", " --no-cert-placeholder ")
        .split(" --no-cert-placeholder ")
        .next()
        .unwrap()
        .to_string();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{plain} -o /dev/null"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a request without a client certificate succeeded"
    );
    stop_dev(dev);
    for f in [
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "client.pem",
        "client-key.pem",
    ] {
        assert!(data.join("tls").join(f).exists(), "{f}");
    }
}

#[test]
fn dev_mode_refuses_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    let out = keyward_command()
        .args(["dev", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
