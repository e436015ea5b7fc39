//! After a workload, neither the database files nor the server's logs contain a
//! plaintext, an API secret, the master key or a client key.

use base64::Engine;
use serde_json::json;
use sqlx::{Connection, Row};

use crate::helpers::{contains, decrypt_body, rand_bytes, read_tree, Backend, TestApp};

crate::on_both_databases!(no_plaintext_secret_or_key_reaches_the_database_or_the_logs);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn no_plaintext_secret_or_key_reaches_the_database_or_the_logs(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;

    let alice = app.create_tenant("alice");
    let limited = app.create_key(&alice.tenant_id, "encrypt");
    let (enc, _) = app.create_encryption(&alice).await;
    let client_key: [u8; 32] = rand_bytes();
    let client_key_b64 = b64.encode(client_key);
    let (status, client_enc) = crate::helpers::send(
        app.req(reqwest::Method::POST, "/v1/encryptions", &alice)
            .header("X-Master-Key", &client_key_b64)
            .json(&json!({})),
    )
    .await;
    assert_eq!(status, 201, "{client_enc}");
    let client_enc = client_enc["encryptionId"].as_str().unwrap().to_string();

    let mut plaintexts = vec![];
    for i in 0..20 {
        let p = format!("PLAINTEXT-MARKER-{i}-{}", uuid::Uuid::new_v4().simple());
        let e = app.encrypt(&alice, &enc, &p).await;
        let (status, _) = app.decrypt(&alice, &e).await;
        assert_eq!(status, 200);
        let (status, e) = crate::helpers::send(
            app.req(reqwest::Method::POST, "/v1/encrypt", &alice)
                .header("X-Master-Key", &client_key_b64)
                .json(&json!({"encryptionId": client_enc, "data": p})),
        )
        .await;
        assert_eq!(status, 200, "{e}");
        let (status, _) = crate::helpers::send(
            app.req(reqwest::Method::POST, "/v1/decrypt", &alice)
                .header("X-Master-Key", &client_key_b64)
                .json(&decrypt_body(&e)),
        )
        .await;
        assert_eq!(status, 200);
        plaintexts.push(p);
    }
    app.rotate(&alice, &enc).await;
    // Failures carry secrets and plaintext too: none may be logged.
    let (status, _) = app
        .decrypt(&limited, &app.encrypt(&alice, &enc, &plaintexts[0]).await)
        .await;
    assert_eq!(status, 403);
    let wrong = crate::helpers::Creds {
        secret: format!("{}x", alice.secret),
        ..alice.clone()
    };
    let (status, _) = app
        .post(
            "/v1/encrypt",
            &wrong,
            &json!({"encryptionId": enc, "data": plaintexts[1]}),
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = app
        .post(
            "/v1/encrypt",
            &alice,
            &json!({"encryptionId": plaintexts[2], "data": plaintexts[3]}),
        )
        .await;
    assert_eq!(status, 400);
    app.restart();
    let e = app.encrypt(&alice, &enc, &plaintexts[4]).await;
    assert_eq!(app.decrypt(&alice, &e).await.0, 200);
    app.stop();

    let master_raw = b64.decode(&app.master_key).unwrap();
    let mut needles: Vec<(String, Vec<u8>)> = vec![
        (
            "master key (base64)".into(),
            app.master_key.clone().into_bytes(),
        ),
        ("master key (raw)".into(), master_raw.clone()),
        ("master key (hex)".into(), hex(&master_raw).into_bytes()),
        (
            "client key (base64)".into(),
            client_key_b64.clone().into_bytes(),
        ),
        ("client key (raw)".into(), client_key.to_vec()),
        ("client key (hex)".into(), hex(&client_key).into_bytes()),
    ];
    for creds in [&alice, &limited] {
        needles.push((
            format!("secret of {}", creds.key),
            creds.secret.clone().into_bytes(),
        ));
        let raw = b64url
            .decode(creds.secret.trim_start_matches("kws_"))
            .unwrap();
        needles.push((format!("raw secret of {}", creds.key), raw.clone()));
        needles.push((
            format!("hex secret of {}", creds.key),
            hex(&raw).into_bytes(),
        ));
    }
    for p in &plaintexts {
        needles.push((format!("plaintext {p}"), p.clone().into_bytes()));
        needles.push((format!("hex plaintext {p}"), hex(p.as_bytes()).into_bytes()));
    }

    // What the database holds: its files, and every row as text.
    let mut haystacks: Vec<(String, Vec<u8>)> =
        vec![("server log".into(), app.log_text().into_bytes())];
    match backend {
        Backend::Sqlite => {
            let files = read_tree(app.db.dir.path());
            assert!(files.iter().any(|(p, _)| p.ends_with("keyward.db")));
            haystacks.extend(files.into_iter().map(|(p, b)| (p.display().to_string(), b)));
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
            sqlx::query("CHECKPOINT").execute(&mut conn).await.unwrap();
            let tables: Vec<String> =
                sqlx::query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                    .fetch_all(&mut conn)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<String, _>(0))
                    .collect();
            assert!(tables.contains(&"encryption_key_versions".to_string()));
            for t in tables {
                let rows = sqlx::query(&format!("SELECT t::text FROM {t} t"))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
                let text: String = rows.iter().map(|r| r.get::<String, _>(0) + "\n").collect();
                haystacks.push((format!("table {t}"), text.into_bytes()));
            }
            // The cluster's files for this database, and the write-ahead log every
            // change passed through.
            if let Ok(data) = std::env::var("KEYWARD_TEST_PG_DATA") {
                let oid: i64 = sqlx::query(
                    "SELECT oid::bigint FROM pg_database WHERE datname = current_database()",
                )
                .fetch_one(&mut conn)
                .await
                .unwrap()
                .get(0);
                let data = std::path::Path::new(&data);
                for dir in [data.join("base").join(oid.to_string()), data.join("pg_wal")] {
                    let files = read_tree(&dir);
                    assert!(!files.is_empty(), "nothing to scan in {}", dir.display());
                    haystacks.extend(files.into_iter().map(|(p, b)| (p.display().to_string(), b)));
                }
            }
        }
    }
    let mut leaks = vec![];
    for (what, needle) in &needles {
        for (where_, hay) in &haystacks {
            if contains(hay, needle) {
                leaks.push(format!("{what} found in {where_}"));
            }
        }
    }
    assert!(leaks.is_empty(), "leaks:\n{}", leaks.join("\n"));
    // The log is not empty: the scan looked at something real.
    assert!(app.log_shows("listening").await);
}
