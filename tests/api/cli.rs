//! The command line: migrate, tenants, API keys, configuration errors.

use serde_json::Value;

use crate::helpers::{keyward_command, random_master_key, Backend, TestDatabase};

crate::on_both_databases!(migrate_tenant_and_apikey_commands_work_and_fail_clearly);

fn run(db: &TestDatabase, args: &[&str]) -> std::process::Output {
    keyward_command()
        .args(args)
        .env("KEYWARD_DATABASE_URL", &db.url)
        .output()
        .expect("run keyward")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn migrate_tenant_and_apikey_commands_work_and_fail_clearly(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    for _ in 0..2 {
        let out = run(&db, &["migrate"]);
        assert!(
            out.status.success(),
            "migrate is idempotent: {}",
            stderr(&out)
        );
    }

    let out = run(&db, &["tenant", "create", "acme", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tenant: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut keys: Vec<&str> = tenant
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, ["apiKey", "apiSecret", "name", "tenantId"]);
    assert_eq!(tenant["name"], "acme");
    let tenant_id = tenant["tenantId"].as_str().unwrap();

    let out = run(&db, &["tenant", "create", "acme", "--json"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());

    let out = run(
        &db,
        &[
            "apikey",
            "create",
            "--tenant",
            tenant_id,
            "--scopes",
            "encrypt,decrypt",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let key: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(key["scopes"], serde_json::json!(["encrypt", "decrypt"]));
    assert!(key["apiKey"].as_str().unwrap().starts_with("kw_"));
    assert!(key["apiSecret"].as_str().unwrap().starts_with("kws_"));

    let failures: [(&[&str], &str); 4] = [
        (
            &[
                "apikey",
                "create",
                "--tenant",
                tenant_id,
                "--scopes",
                "encrypt,root",
                "--json",
            ],
            "unknown scope `root`",
        ),
        (
            &[
                "apikey",
                "create",
                "--tenant",
                "not-a-uuid",
                "--scopes",
                "encrypt",
            ],
            "--tenant",
        ),
        (
            &[
                "apikey",
                "create",
                "--tenant",
                "00000000-0000-4000-8000-000000000000",
                "--scopes",
                "encrypt",
            ],
            "not found",
        ),
        (
            &["apikey", "revoke", "kw_000000000000000000000000"],
            "no live API key",
        ),
    ];
    for (args, expected) in failures {
        let out = run(&db, args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn unknown_or_invalid_settings_stop_serve_with_the_setting_named() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("k.db").display());
    let key = random_master_key();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![
                ("KEYWARD_DATABASE_URL", &db),
                ("KEYWARD_MASTER_KEY", &key),
                ("KEYWARD_LISTN", "127.0.0.1:0"),
            ],
            "KEYWARD_LISTN",
        ),
        (vec![("KEYWARD_MASTER_KEY", &key)], "KEYWARD_DATABASE_URL"),
        (
            vec![("KEYWARD_DATABASE_URL", &db)],
            "KEYWARD_MASTER_KEY is required",
        ),
        (
            vec![
                ("KEYWARD_DATABASE_URL", &db),
                ("KEYWARD_MASTER_KEY", &key),
                ("KEYWARD_LISTEN", "nowhere"),
            ],
            "KEYWARD_LISTEN",
        ),
        (
            vec![
                ("KEYWARD_DATABASE_URL", "mysql://x"),
                ("KEYWARD_MASTER_KEY", &key),
            ],
            "KEYWARD_DATABASE_URL",
        ),
        (
            vec![
                ("KEYWARD_DATABASE_URL", &db),
                ("KEYWARD_MASTER_KEY", &key),
                ("KEYWARD_SYNC_INTERVAL", "soon"),
            ],
            "KEYWARD_SYNC_INTERVAL",
        ),
    ];
    for (env, expected) in cases {
        let out = keyward_command()
            .arg("serve")
            .envs(env.clone())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{env:?}: {err}");
        assert!(!err.contains(&key), "the master key is echoed: {err}");
    }

    let file = dir.path().join("keyward.toml");
    std::fs::write(
        &file,
        format!("database_url = \"{db}\"\nlisten_adress = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let out = keyward_command()
        .args(["serve", "--config", file.to_str().unwrap()])
        .env("KEYWARD_MASTER_KEY", &key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_adress"));
}
