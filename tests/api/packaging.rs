//! Packaging: the Dockerfile passes hadolint, the Helm chart renders with Helm's
//! own engine (helm-python-sdk) and validates against the Kubernetes schemas
//! (kubernetes-validate), and the binary runs as a non-root user with the
//! image's settings and answers its HEALTHCHECK. The tools come from the test
//! venv that scripts/test prepares.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::helpers::{keyward_command, random_master_key, BIN};

fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var("KEYWARD_PEER_VENV")
        .expect("KEYWARD_PEER_VENV is not set: run the tests through scripts/test");
    PathBuf::from(venv).join("bin").join(name)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let out = Command::new(venv_bin("hadolint"))
        .arg(root().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    for needed in ["USER 65532:65532", "HEALTHCHECK", "AS build", "distroless"] {
        assert!(dockerfile.contains(needed), "the Dockerfile lacks {needed}");
    }
    assert!(
        !dockerfile.contains("KEYWARD_MASTER_KEY="),
        "no secret is baked in"
    );
}

const RENDER: &str = r#"
import json, sys, pathlib, subprocess
import helm_python as helm
chart = helm.Chart.load(sys.argv[1])
out = pathlib.Path(sys.argv[2])
cases = {
    "mtls": {"tls": {"secretName": "kw-tls", "clientCa": {"secretName": "kw-ca"}, "clientCrl": {"secretName": "kw-crl"}}},
    "plaintext": {"allowPlaintext": True, "trustedProxies": {"cidrs": "10.0.0.0/8", "header": "forwarded"}},
    "aws-kms": {"tls": {"secretName": "kw-tls"}, "serviceAccountName": "keyward-kms",
                "masterKey": {"provider": "aws-kms", "awsKms": {"keyId": "alias/keyward", "region": "eu-north-1"}}},
    "vault": {"tls": {"secretName": "kw-tls"},
              "masterKey": {"provider": "vault", "vault": {"addr": "https://vault:8200", "transitKey": "keyward",
                            "tokenSecret": {"name": "kw-vault-token"}, "caSecret": {"name": "kw-vault-ca"}}}},
    "vault-approle": {"tls": {"secretName": "kw-tls"},
              "masterKey": {"provider": "vault", "vault": {"addr": "https://vault:8200", "transitKey": "keyward",
                            "roleId": "role-1", "secretIdSecret": {"name": "kw-vault-approle"}}}},
    "pkcs11": {"tls": {"secretName": "kw-tls"},
               "masterKey": {"provider": "pkcs11", "pkcs11": {
                   "moduleVolume": {"hostPath": {"path": "/opt/hsm-client/lib", "type": "Directory"}},
                   "modulePath": "libvendor-pkcs11.so", "tokenLabel": "keyward", "keyLabel": "root-kek-wrapper",
                   "pinSecret": {"name": "kw-hsm-pin"},
                   "extraEnv": [{"name": "VENDOR_HSM_CONF", "value": "/opt/pkcs11/vendor.conf"}]}}},
    "azure": {"tls": {"secretName": "kw-tls"},
              "masterKey": {"provider": "azure-key-vault", "azure": {
                  "vaultUrl": "https://kw-prod.vault.azure.net", "key": "keyward-root",
                  "workloadIdentity": {"clientId": "0f5fd1b4-c3d9-4a4a-8c3b-0a7d2e3b6c1d"}}}},
    "azure-existing-sa": {"tls": {"secretName": "kw-tls"}, "serviceAccountName": "kw-azure-identity",
              "masterKey": {"provider": "azure-key-vault", "azure": {
                  "vaultUrl": "https://kw-hsm.managedhsm.azure.net", "key": "keyward-root", "algorithm": "A256KW",
                  "workloadIdentity": {"createServiceAccount": False}}}},
    "tpm": {"tls": {"secretName": "kw-tls"}, "replicaCount": 1,
            "masterKey": {"provider": "tpm", "tpm": {
                "pcrs": "7", "hostDevice": True, "deviceGroup": 59,
                "nodeSelector": {"kubernetes.io/hostname": "node-with-tpm"}}}},
    "tpm-plugin": {"tls": {"secretName": "kw-tls"}, "replicaCount": 1,
            "masterKey": {"provider": "tpm", "tpm": {
                "deviceResource": "squat.ai/tpmrm", "deviceGroup": 59,
                "nodeSelector": {"kubernetes.io/hostname": "node-with-tpm"}}}},
}
refused = {
    "pkcs11-no-module": {"tls": {"secretName": "kw-tls"}, "masterKey": {"provider": "pkcs11", "pkcs11": {
        "modulePath": "x.so", "tokenLabel": "t", "keyLabel": "k", "pinSecret": {"name": "p"}}}},
    "vault-no-login": {"tls": {"secretName": "kw-tls"}, "masterKey": {"provider": "vault", "vault": {
        "addr": "https://vault:8200", "transitKey": "k"}}},
    "aws-no-region": {"tls": {"secretName": "kw-tls"}, "masterKey": {"provider": "aws-kms", "awsKms": {"keyId": "k"}}},
    "unknown-provider": {"tls": {"secretName": "kw-tls"}, "masterKey": {"provider": "tpm2"}},
    "tpm-replicas": {"tls": {"secretName": "kw-tls"}, "masterKey": {"provider": "tpm", "tpm": {
        "hostDevice": True, "nodeSelector": {"kubernetes.io/hostname": "n"}}}},
    "tpm-no-device": {"tls": {"secretName": "kw-tls"}, "replicaCount": 1, "masterKey": {"provider": "tpm", "tpm": {
        "nodeSelector": {"kubernetes.io/hostname": "n"}}}},
    "tpm-no-node": {"tls": {"secretName": "kw-tls"}, "replicaCount": 1, "masterKey": {"provider": "tpm", "tpm": {
        "hostDevice": True}}},
    "azure-no-identity": {"tls": {"secretName": "kw-tls"}, "masterKey": {"provider": "azure-key-vault", "azure": {
        "vaultUrl": "https://kw.vault.azure.net", "key": "k"}}},
    "azure-existing-sa-unnamed": {"tls": {"secretName": "kw-tls"}, "masterKey": {"provider": "azure-key-vault",
        "azure": {"vaultUrl": "https://kw.vault.azure.net", "key": "k",
                  "workloadIdentity": {"createServiceAccount": False}}}},
    "azure-no-key": {"tls": {"secretName": "kw-tls"}, "masterKey": {"provider": "azure-key-vault", "azure": {
        "vaultUrl": "https://kw.vault.azure.net", "workloadIdentity": {"clientId": "c"}}}},
}
result = {}
for name, values in cases.items():
    manifests = chart.render(values=values, name="kw")
    docs = []
    for path, text in manifests.items():
        if text.strip() and path.endswith((".yaml", ".yml")):
            f = out / f"{name}-{pathlib.Path(path).name}"
            f.write_text(text)
            docs.append(str(f))
    check = subprocess.run([sys.argv[3], "--strict", "-k", "1.31.0", *docs], capture_output=True, text=True)
    result[name] = {"files": docs, "validate_rc": check.returncode, "validate_out": check.stdout + check.stderr}
try:
    chart.render(values={}, name="kw")
    result["neither"] = "rendered"
except Exception as e:
    result["neither"] = str(e)
for name, values in refused.items():
    try:
        chart.render(values=values, name="kw")
        result[name] = "rendered"
    except Exception as e:
        result[name] = str(e)
print(json.dumps(result))
"#;

#[test]
fn the_helm_chart_renders_and_validates_against_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(venv_bin("python"))
        .args(["-c", RENDER])
        .arg(root().join("helm/keyward"))
        .arg(dir.path())
        .arg(venv_bin("kubernetes-validate"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "render: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for case in [
        "mtls",
        "plaintext",
        "aws-kms",
        "vault",
        "vault-approle",
        "pkcs11",
        "azure",
        "azure-existing-sa",
        "tpm",
        "tpm-plugin",
    ] {
        assert_eq!(
            result[case]["validate_rc"], 0,
            "{case}: {}",
            result[case]["validate_out"]
        );
    }
    // Each provider wired: its settings, its secrets as file:// references
    // to mounted Secrets (never values), the PKCS#11 module from a volume.
    let rendered = |case: &str| -> String {
        result[case]["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| std::fs::read_to_string(f.as_str().unwrap()).unwrap())
            .collect()
    };
    for (case, needed) in [
        (
            "aws-kms",
            &[
                "value: \"aws-kms\"",
                "KEYWARD_AWS_KMS_KEY_ID",
                "value: \"eu-north-1\"",
                "serviceAccountName: keyward-kms",
            ][..],
        ),
        (
            "vault",
            &[
                "KEYWARD_VAULT_ADDR",
                "value: \"file:///etc/keyward/provider/vault-token\"",
                "KEYWARD_VAULT_CA_FILE",
                "name: kw-vault-token",
                "name: kw-vault-ca",
            ][..],
        ),
        (
            "vault-approle",
            &[
                "KEYWARD_VAULT_ROLE_ID",
                "value: \"file:///etc/keyward/provider/vault-secret-id\"",
                "name: kw-vault-approle",
            ][..],
        ),
        (
            "pkcs11",
            &[
                "value: \"pkcs11\"",
                "value: \"/opt/pkcs11/libvendor-pkcs11.so\"",
                "KEYWARD_PKCS11_TOKEN_LABEL",
                "KEYWARD_PKCS11_KEY_LABEL",
                "value: \"file:///etc/keyward/provider/pkcs11-pin\"",
                "name: kw-hsm-pin",
                "mountPath: /opt/pkcs11",
                "path: /opt/hsm-client/lib",
                "VENDOR_HSM_CONF",
            ][..],
        ),
        // Azure Key Vault with workload identity: the ServiceAccount the chart
        // makes carries the identity's client id, the pods the webhook's label.
        (
            "azure",
            &[
                "kind: ServiceAccount",
                "azure.workload.identity/client-id: \"0f5fd1b4-c3d9-4a4a-8c3b-0a7d2e3b6c1d\"",
                "azure.workload.identity/use: \"true\"",
                "serviceAccountName: kw-keyward",
                "value: \"azure-key-vault\"",
                "KEYWARD_AZURE_KEY_VAULT_URL",
                "value: \"https://kw-prod.vault.azure.net\"",
                "KEYWARD_AZURE_KEY_VAULT_KEY",
                "value: \"keyward-root\"",
                "value: \"RSA-OAEP-256\"",
                "KEYWARD_AZURE_CREDENTIAL",
                "value: workload-identity",
            ][..],
        ),
        (
            "azure-existing-sa",
            &[
                "azure.workload.identity/use: \"true\"",
                "serviceAccountName: kw-azure-identity",
                "value: \"A256KW\"",
                "value: \"https://kw-hsm.managedhsm.azure.net\"",
            ][..],
        ),
        // The TPM: the device from the host or from a device plugin, its
        // group, the node, one replica.
        (
            "tpm",
            &[
                "value: \"tpm\"",
                "KEYWARD_TPM_TCTI",
                "value: \"device:/dev/tpmrm0\"",
                "KEYWARD_TPM_PCRS",
                "path: /dev/tpmrm0",
                "type: CharDevice",
                "mountPath: /dev/tpmrm0",
                "supplementalGroups: [59]",
                "kubernetes.io/hostname: node-with-tpm",
                "replicas: 1",
            ][..],
        ),
        (
            "tpm-plugin",
            &[
                "value: \"tpm\"",
                "squat.ai/tpmrm: \"1\"",
                "memory: 256Mi",
                "supplementalGroups: [59]",
                "kubernetes.io/hostname: node-with-tpm",
            ][..],
        ),
    ] {
        let text = rendered(case);
        for n in needed {
            assert!(text.contains(n), "{case} lacks `{n}`:\n{text}");
        }
        assert!(
            !text.contains("KEYWARD_MASTER_KEY\n"),
            "{case} still sets KEYWARD_MASTER_KEY:\n{text}"
        );
        assert!(!text.contains("name: KEYWARD_MASTER_KEY\n"), "{case}");
    }
    // What one provider needs stays out of the others' releases.
    assert!(!rendered("tpm-plugin").contains("hostPath"));
    assert!(!rendered("tpm").contains("squat.ai/tpmrm"));
    assert!(!rendered("azure-existing-sa").contains("kind: ServiceAccount"));
    for case in ["mtls", "aws-kms", "vault", "pkcs11", "tpm"] {
        let text = rendered(case);
        assert!(!text.contains("kind: ServiceAccount"), "{case}:\n{text}");
        assert!(!text.contains("azure.workload.identity"), "{case}:\n{text}");
    }
    for case in ["mtls", "aws-kms", "azure"] {
        let text = rendered(case);
        assert!(!text.contains("nodeSelector"), "{case}:\n{text}");
        assert!(!text.contains("supplementalGroups"), "{case}:\n{text}");
    }
    for (case, word) in [
        ("pkcs11-no-module", "moduleVolume"),
        ("vault-no-login", "tokenSecret"),
        ("aws-no-region", "region"),
        ("unknown-provider", "masterKey.provider"),
        ("tpm-replicas", "replicaCount=1"),
        ("tpm-no-device", "masterKey.tpm.deviceResource"),
        ("tpm-no-node", "masterKey.tpm.nodeSelector"),
        (
            "azure-no-identity",
            "masterKey.azure.workloadIdentity.clientId",
        ),
        ("azure-existing-sa-unnamed", "serviceAccountName"),
        ("azure-no-key", "masterKey.azure.key"),
    ] {
        let e = result[case].as_str().unwrap_or_default();
        assert!(e != "rendered" && e.contains(word), "{case}: {e}");
    }
    assert_ne!(
        result["neither"], "rendered",
        "the chart refuses neither TLS nor allowPlaintext"
    );
    let plaintext: String = result["plaintext"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| std::fs::read_to_string(f.as_str().unwrap()).unwrap())
        .collect();
    for needed in [
        "KEYWARD_TRUSTED_PROXIES",
        "\"10.0.0.0/8\"",
        "KEYWARD_TRUSTED_PROXY_HEADER",
    ] {
        assert!(plaintext.contains(needed), "lacks `{needed}`:\n{plaintext}");
    }
    let all: String = result["mtls"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| std::fs::read_to_string(f.as_str().unwrap()).unwrap())
        .collect();
    for needed in [
        "kind: Deployment",
        "kind: PodDisruptionBudget",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "path: /healthz",
        "path: /readyz",
        "secretKeyRef",
        "KEYWARD_TLS_CLIENT_CA",
        "KEYWARD_TLS_CLIENT_CRL",
        "enableServiceLinks: false",
        "limits:",
        "requests:",
    ] {
        assert!(
            all.contains(needed),
            "the rendered chart lacks `{needed}`:\n{all}"
        );
    }
}

#[test]
fn the_binary_runs_as_a_non_root_user_with_the_image_settings_and_answers_its_healthcheck() {
    // As in the image: a non-root user, its own data folder, the ops listener,
    // plain HTTP allowed only because this test has no TLS files (loopback).
    let is_root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("keyward");
    std::fs::copy(BIN, &bin).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let ops = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = if is_root {
        Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(dir.path())
            .status()
            .unwrap();
        Command::new("chmod")
            .args(["755"])
            .arg(dir.path())
            .status()
            .unwrap();
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYWARD_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .arg("serve")
        .current_dir(&data)
        .env("KEYWARD_LISTEN", "127.0.0.1:0")
        .env("KEYWARD_OPS_LISTEN", format!("127.0.0.1:{ops}"))
        .env(
            "KEYWARD_DATABASE_URL",
            format!("sqlite://{}/keyward.db", data.display()),
        )
        .env("KEYWARD_MASTER_KEY", random_master_key())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = keyward_command()
            .args(["healthcheck", "--url", &format!("http://127.0.0.1:{ops}")])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "keyward exited");
        assert!(
            Instant::now() < deadline,
            "no healthy answer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    // Only the data folder was written.
    assert!(data.join("keyward.db").exists());
    // A closed port is unhealthy.
    let out = keyward_command()
        .args(["healthcheck", "--url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
