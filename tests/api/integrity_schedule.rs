//! A randomised schedule over two replicas sharing one database (issue #26,
//! "Tests that must exist"): a few hundred steps drawn from encrypt, decrypt,
//! rotate, version state changes, destroy with and without `force`, rewrap,
//! re-encryption jobs over a platform table, root-KEK rotation, master-key
//! migration, replica restarts (SIGTERM and SIGKILL) and, on PostgreSQL, cuts
//! of one replica's database connection (its change feed).
//!
//! The test keeps a model of what every replica may legitimately answer and
//! checks each answer against it as it goes; at the end every ciphertext that
//! was acknowledged and is still held (the platform table's current
//! ciphertexts included) must decrypt on both replicas to its plaintext,
//! unless its version was destroyed with `force`, or destroyed without it
//! while no job over its table could have seen it (the guard's documented
//! limit, counted and printed).
//!
//! The seed is printed when the test fails; `KEYWARD_TEST_SEED=<seed>`
//! replays the same choices (answers that depend on timing may differ).
//! `scripts/test integrity` runs it with the other integrity tests.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Connection, Row};

use crate::helpers::{
    decrypt_body, keyward_command, random_master_key, send, Backend, Creds, TestApp,
};
use crate::jobs::{spawn_with_platform, Platform};
use crate::providers::Forwarder;

crate::on_both_databases!(
    integrity_a_random_schedule_on_two_replicas_loses_no_acknowledged_ciphertext,
    integrity_a_replica_on_the_replaced_master_key_stops_once_a_root_kek_it_cannot_unwrap_is_in_use,
);

/// Steps per run: enough for every kind of step to occur many times (each
/// kind at least a few times at its weight), and short enough for the whole
/// run to stay within about a minute per database on a debug build.
const STEPS: usize = 400;
/// `KEYWARD_CHANGE_FEED_MAX_LAG` for both replicas.
const MAX_LAG: Duration = Duration::from_secs(2);
/// `KEYWARD_DESTROY_GRACE`: longer than the lag bound plus a poll interval.
const GRACE: Duration = Duration::from_secs(3);
/// How long after a change a replica may still answer from the state before
/// it: the lag bound plus a margin for a loaded machine.
const STALE: Duration = Duration::from_millis(3000);
/// How long a replica may answer `503` after it was (re)started or its
/// database connection was restored.
const SETTLE: Duration = Duration::from_secs(10);

/// splitmix64: small, seedable, good enough to draw a schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Prints the seed if the test fails, so that it can be replayed.
struct SeedReport {
    seed: u64,
    backend: Backend,
}

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "integrity schedule failed on {:?} with seed {}: replay with KEYWARD_TEST_SEED={}",
                self.backend, self.seed, self.seed
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active,
    Enabled,
    DecryptOnly,
    Disabled,
    Destroyed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Enabled => "enabled",
            State::DecryptOnly => "decrypt_only",
            State::Disabled => "disabled",
            State::Destroyed => "destroyed",
        }
    }
}

/// One version as the test knows it.
struct Version {
    id: String,
    /// Every state it had and when the answer that set it arrived.
    history: Vec<(Instant, State)>,
    /// When the request that disabled it (this time) was sent and answered.
    disabled: Option<(Instant, Instant)>,
    forced: bool,
}

impl Version {
    fn state(&self) -> State {
        self.history.last().unwrap().1
    }
    /// Every state a replica may still act on: the current one and those it
    /// had within the last [`STALE`].
    fn recent_states(&self) -> Vec<State> {
        let since = Instant::now() - STALE;
        let mut out = vec![];
        for (i, (at, s)) in self.history.iter().enumerate() {
            let ended = self.history.get(i + 1).map(|(t, _)| *t);
            if ended.is_none_or(|t| t >= since) || *at >= since {
                out.push(*s);
            }
        }
        out
    }
    fn set(&mut self, s: State) {
        self.history.push((Instant::now(), s));
    }
}

/// What the last job over an encryption's table found: rows by version.
struct JobFinding {
    rows_on: HashMap<String, Vec<i64>>,
    /// When the request that started it was sent (it ended after that).
    started: Instant,
}

struct Encryption {
    id: String,
    table: String,
    versions: Vec<Version>,
    last_job: Option<JobFinding>,
}

impl Encryption {
    fn active(&self) -> usize {
        self.versions
            .iter()
            .position(|v| v.state() == State::Active)
            .unwrap()
    }
    fn version(&self, id: &str) -> usize {
        let id = id.to_ascii_lowercase();
        self.versions
            .iter()
            .position(|v| v.id == id)
            .unwrap_or_else(|| panic!("an unknown version id {id}"))
    }
}

/// A ciphertext the test holds (acknowledged by Keyward), loose or in a row
/// of the platform table.
struct Held {
    enc: usize,
    data: String,
    /// encryptionId, cipherText, encryptionVersionId, metadata.
    ct: Value,
    row: Option<i64>,
    /// Lost to a destroy without `force` that no job could have warned of.
    unseen_loss: bool,
}

impl Held {
    fn version(&self) -> &str {
        self.ct["encryptionVersionId"].as_str().unwrap()
    }
}

#[derive(Default, Debug)]
struct Tally {
    by_step: BTreeMap<&'static str, usize>,
    ok: usize,
    not_ready: usize,
    refused_destroys: BTreeMap<String, usize>,
    destroys: usize,
    forced: usize,
    stale_answers: usize,
    migrations: usize,
    failed_migrations: usize,
    root_kek_rotations: usize,
    unseen_loose: usize,
    unseen_rows: usize,
}

struct Schedule {
    rng: Rng,
    backend: Backend,
    apps: [TestApp; 2],
    /// When each replica may again be expected to answer without `503`.
    settling: [Instant; 2],
    /// A replica still on a migrated-away master key after a root-KEK
    /// rotation by one on the new key: it cannot unwrap the new KEK and
    /// answers `503 not_ready` until restarted.
    stranded: [bool; 2],
    forwarder: Option<Forwarder>,
    cut_until: Option<Instant>,
    creds: Creds,
    operator: Creds,
    platform: Platform,
    db: sqlx::AnyConnection,
    /// The master key the root KEKs are wrapped with now.
    db_key: String,
    encs: Vec<Encryption>,
    held: Vec<Held>,
    next_row: i64,
    step: usize,
    tally: Tally,
}

async fn integrity_a_random_schedule_on_two_replicas_loses_no_acknowledged_ciphertext(
    backend: Backend,
) {
    let seed = match std::env::var("KEYWARD_TEST_SEED") {
        Ok(s) => s.parse().expect("KEYWARD_TEST_SEED is a number"),
        Err(_) => u64::from_le_bytes(crate::helpers::rand_bytes::<8>()),
    };
    println!("integrity schedule on {backend:?}: seed {seed}");
    let _report = SeedReport { seed, backend };
    let started = Instant::now();
    let mut s = Schedule::new(backend, seed).await;
    for step in 0..STEPS {
        s.step = step;
        s.one_step().await;
    }
    let schedule_time = started.elapsed();
    s.finish().await;
    println!(
        "integrity schedule on {backend:?}: {STEPS} steps in {:.1} s, checked in {:.1} s total; {} ciphertexts held; {:?}",
        schedule_time.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        s.held.len(),
        s.tally
    );
}

impl Schedule {
    async fn new(backend: Backend, seed: u64) -> Schedule {
        let platform = Platform::new(backend).await;
        let (lag, grace) = (
            format!("{}ms", MAX_LAG.as_millis()),
            format!("{}ms", GRACE.as_millis()),
        );
        let settings = [
            ("KEYWARD_CHANGE_FEED_MAX_LAG", lag.as_str()),
            ("KEYWARD_DESTROY_GRACE", grace.as_str()),
        ];
        let a = spawn_with_platform(backend, &platform, &settings).await;
        let (forwarder, b) = match backend {
            // The second replica reaches PostgreSQL through a forwarder that
            // the schedule cuts now and then.
            Backend::Postgres => {
                let host_port =
                    a.db.url
                        .split('@')
                        .nth(1)
                        .and_then(|rest| rest.split('/').next())
                        .unwrap()
                        .to_string();
                let forwarder = Forwarder::start(&host_port).await;
                let through =
                    a.db.url
                        .replace(&host_port, &format!("127.0.0.1:{}", forwarder.port));
                let b = a.spawn_replica(&[("KEYWARD_DATABASE_URL", &through)]);
                (Some(forwarder), b)
            }
            Backend::Sqlite => (None, a.spawn_replica(&[])),
        };
        let creds = a.create_tenant("platform");
        let operator = a.create_operator();
        sqlx::any::install_default_drivers();
        let url = platform.url();
        let url = if url.starts_with("sqlite:") {
            format!("{url}?mode=rwc")
        } else {
            url
        };
        let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
        let mut encs = vec![];
        for i in 0..2 {
            let table = format!("held_{i}");
            sqlx::query(&format!("CREATE TABLE {table} (id BIGINT PRIMARY KEY, cipher_text TEXT NOT NULL, version TEXT NOT NULL, metadata TEXT NOT NULL)"))
                .execute(&mut db)
                .await
                .unwrap();
            let (id, v1) = a.create_encryption(&creds).await;
            encs.push(Encryption {
                id,
                table,
                versions: vec![Version {
                    id: v1.to_ascii_lowercase(),
                    history: vec![(Instant::now(), State::Active)],
                    disabled: None,
                    forced: false,
                }],
                last_job: None,
            });
        }
        let db_key = a.master_key.clone();
        let now = Instant::now();
        Schedule {
            rng: Rng(seed),
            backend,
            apps: [a, b],
            settling: [now + SETTLE, now + SETTLE],
            stranded: [false, false],
            forwarder,
            cut_until: None,
            creds,
            operator,
            platform,
            db,
            db_key,
            encs,
            held: vec![],
            next_row: 1,
            step: 0,
            tally: Tally::default(),
        }
    }

    fn ctx(&self, what: &str) -> String {
        format!("step {} ({what})", self.step)
    }

    fn settled(&self, r: usize) -> bool {
        Instant::now() >= self.settling[r]
            && (r == 0 || self.cut_until.is_none())
            && !self.stranded[r]
    }

    /// The last error and warning lines of replica `r`'s log.
    fn log_errors(&self, r: usize) -> String {
        let log = self.apps[r].log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("request failed") || l.contains("\"warn")
            })
            .collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Sends one request; a 500 (or any 5xx but 503) is never acceptable,
    /// and a 503 only while the replica is restarting or cut off.
    async fn call(
        &mut self,
        r: usize,
        method: reqwest::Method,
        path: &str,
        creds: &Creds,
        body: Option<Value>,
        what: &str,
    ) -> (StatusCode, Value) {
        let mut req = self.apps[r].req(method, path, creds);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let (status, body) = send(req).await;
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            // The log line may reach us after the answer.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
            "{}: replica {r} answered {status}: {body}\nits last errors:\n{}",
            self.ctx(what),
            self.log_errors(r)
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                !self.settled(r),
                "{}: replica {r} answered 503 while neither restarting nor cut off: {body}",
                self.ctx(what)
            );
            self.tally.not_ready += 1;
        } else {
            self.tally.ok += 1;
        }
        (status, body)
    }

    /// Whether `answer` is a dependency error (`503 not_ready` or
    /// `unavailable`, whole or for one batch item) that replica `r` may give
    /// now: only while it restarts or is cut off.
    fn may_be_unavailable(&self, r: usize, answer: &Value) -> bool {
        matches!(
            answer["error"]["code"].as_str(),
            Some("not_ready" | "unavailable")
        ) && !self.settled(r)
    }

    async fn one_step(&mut self) {
        if let Some(until) = self.cut_until {
            if Instant::now() >= until {
                self.restore_cut().await;
            }
        }
        // Weights out of 1000.
        let roll = self.rng.below(1000);
        let kind = match roll {
            0..220 => "encrypt",
            220..370 => "decrypt",
            370..450 => "rotate",
            450..570 => "set_state",
            570..680 => "destroy",
            680..695 => "destroy_force",
            695..775 => "rewrap",
            775..835 => "job",
            835..865 => "root_kek",
            865..880 => "migrate",
            880..925 => "restart",
            925..950 => "cut",
            _ => "pause",
        };
        *self.tally.by_step.entry(kind).or_insert(0) += 1;
        match kind {
            "encrypt" => self.encrypt().await,
            "decrypt" => self.decrypt().await,
            "rotate" => self.rotate().await,
            "set_state" => self.set_state().await,
            "destroy" => self.destroy(false).await,
            "destroy_force" => self.destroy(true).await,
            "rewrap" => self.rewrap().await,
            "job" => self.job().await,
            "root_kek" => self.root_kek().await,
            "migrate" => self.migrate().await,
            "restart" => self.restart().await,
            "cut" => self.cut().await,
            _ => {
                // Lets time pass: grace periods end, replicas catch up.
                let ms = 300 + self.rng.below(1200) as u64;
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
    }

    /// Whether `version_id` of `enc` may be used to encrypt by a replica now:
    /// it is, or was within [`STALE`], the active version.
    fn may_encrypt_with(&self, enc: usize, version_id: &str) -> bool {
        let v = &self.encs[enc].versions[self.encs[enc].version(version_id)];
        v.recent_states().contains(&State::Active)
    }

    /// Checks an encrypt (or rewrap) result and holds the ciphertext.
    fn hold(&mut self, enc: usize, data: String, result: &Value, what: &str) -> usize {
        let version = result["encryptionVersionId"].as_str().unwrap_or_else(|| {
            panic!("{}: no version in {result}", self.ctx(what));
        });
        assert_eq!(result["encryptionId"], self.encs[enc].id.as_str());
        assert!(
            self.may_encrypt_with(enc, version),
            "{}: encrypted under version {version}, which was not active within {STALE:?}: {:?}",
            self.ctx(what),
            self.encs[enc].versions[self.encs[enc].version(version)].history
        );
        if self.encs[enc].versions[self.encs[enc].version(version)].state() != State::Active {
            self.tally.stale_answers += 1;
        }
        self.held.push(Held {
            enc,
            data,
            ct: decrypt_body(result),
            row: None,
            unseen_loss: false,
        });
        self.held.len() - 1
    }

    /// Writes a held ciphertext into its encryption's platform table (as the
    /// platform stores what it got).
    async fn store_row(&mut self, h: usize) {
        let id = self.next_row;
        self.next_row += 1;
        let held = &self.held[h];
        sqlx::query(&format!(
            "INSERT INTO {} (id, cipher_text, version, metadata) VALUES ($1, $2, $3, $4)",
            self.encs[held.enc].table
        ))
        .bind(id)
        .bind(held.ct["cipherText"].as_str().unwrap().to_string())
        .bind(held.version().to_string())
        .bind(held.ct["metadata"].to_string())
        .execute(&mut self.db)
        .await
        .unwrap();
        self.held[h].row = Some(id);
    }

    async fn update_row(&mut self, h: usize) {
        let held = &self.held[h];
        let Some(id) = held.row else { return };
        sqlx::query(&format!(
            "UPDATE {} SET cipher_text = $1, version = $2, metadata = $3 WHERE id = $4",
            self.encs[held.enc].table
        ))
        .bind(held.ct["cipherText"].as_str().unwrap().to_string())
        .bind(held.version().to_string())
        .bind(held.ct["metadata"].to_string())
        .bind(id)
        .execute(&mut self.db)
        .await
        .unwrap();
    }

    async fn encrypt(&mut self) {
        let r = self.rng.below(2);
        let enc = self.rng.below(self.encs.len());
        let n = if self.rng.chance(0.2) { 3 } else { 1 };
        let datas: Vec<String> = (0..n)
            .map(|i| format!("step {} item {i}: {:x}", self.step, self.rng.next()))
            .collect();
        let id = self.encs[enc].id.clone();
        let results: Vec<(StatusCode, Value)> = if n == 1 {
            let body = json!({"encryptionId": id, "data": datas[0]});
            let creds = self.creds.clone();
            vec![
                self.call(
                    r,
                    reqwest::Method::POST,
                    "/v1/encrypt",
                    &creds,
                    Some(body),
                    "encrypt",
                )
                .await,
            ]
        } else {
            let items: Vec<Value> = datas
                .iter()
                .map(|d| json!({"encryptionId": id, "data": d}))
                .collect();
            let creds = self.creds.clone();
            let (status, body) = self
                .call(
                    r,
                    reqwest::Method::POST,
                    "/v1/encrypt/batch",
                    &creds,
                    Some(json!({"items": items})),
                    "encrypt batch",
                )
                .await;
            if status != StatusCode::OK {
                vec![(status, body)]
            } else {
                body["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|item| match item.get("error") {
                        None => (StatusCode::OK, item.clone()),
                        Some(_) => (StatusCode::UNPROCESSABLE_ENTITY, item.clone()),
                    })
                    .collect()
            }
        };
        for ((status, body), data) in results.into_iter().zip(datas) {
            match status {
                StatusCode::OK => {
                    let h = self.hold(enc, data, &body, "encrypt");
                    if self.rng.chance(0.7) {
                        self.store_row(h).await;
                    }
                }
                StatusCode::SERVICE_UNAVAILABLE => {}
                _ => {
                    assert!(
                        self.may_be_unavailable(r, &body),
                        "{}: encrypt on replica {r} refused: {status} {body}",
                        self.ctx("encrypt")
                    );
                }
            }
        }
    }

    /// Checks a decrypt-like answer for held ciphertext `h` against what its
    /// version's recent states allow.
    fn check_read(&self, r: usize, h: usize, ok: bool, body: &Value, what: &str) {
        let held = &self.held[h];
        let e = &self.encs[held.enc];
        let v = &e.versions[e.version(held.version())];
        let states = v.recent_states();
        if ok {
            if what == "decrypt" {
                assert_eq!(
                    body["data"].as_str(),
                    Some(held.data.as_str()),
                    "{}: replica {r} decrypted to something else",
                    self.ctx(what)
                );
            }
            assert!(
                states
                    .iter()
                    .any(|s| matches!(s, State::Active | State::Enabled | State::DecryptOnly)),
                "{}: replica {r} read under version {} in state(s) {states:?}",
                self.ctx(what),
                v.id
            );
            return;
        }
        let code = body["error"]["code"].as_str().unwrap_or_default();
        let allowed = match code {
            "version_disabled" => states.contains(&State::Disabled),
            "version_destroyed" => states.contains(&State::Destroyed),
            "not_ready" | "unavailable" => !self.settled(r),
            _ => false,
        };
        assert!(
            allowed,
            "{}: replica {r} refused a held ciphertext under version {} (recent states {states:?}): {body}",
            self.ctx(what),
            v.id
        );
    }

    fn pick_held(&mut self) -> Option<usize> {
        if self.held.is_empty() {
            None
        } else {
            Some(self.rng.below(self.held.len()))
        }
    }

    async fn decrypt(&mut self) {
        let Some(h) = self.pick_held() else { return };
        let r = self.rng.below(2);
        let creds = self.creds.clone();
        let body = self.held[h].ct.clone();
        let (status, answer) = self
            .call(
                r,
                reqwest::Method::POST,
                "/v1/decrypt",
                &creds,
                Some(body),
                "decrypt",
            )
            .await;
        self.check_read(r, h, status == StatusCode::OK, &answer, "decrypt");
    }

    async fn rewrap(&mut self) {
        let r = self.rng.below(2);
        let n = if self.rng.chance(0.3) { 4 } else { 1 };
        let picked: Vec<usize> = (0..n).filter_map(|_| self.pick_held()).collect();
        if picked.is_empty() {
            return;
        }
        let mut picked = picked;
        picked.sort();
        picked.dedup();
        let creds = self.creds.clone();
        let answers: Vec<(bool, Value)> = if picked.len() == 1 {
            let (status, body) = self
                .call(
                    r,
                    reqwest::Method::POST,
                    "/v1/rewrap",
                    &creds,
                    Some(self.held[picked[0]].ct.clone()),
                    "rewrap",
                )
                .await;
            vec![(status == StatusCode::OK, body)]
        } else {
            let items: Vec<Value> = picked.iter().map(|h| self.held[*h].ct.clone()).collect();
            let (status, body) = self
                .call(
                    r,
                    reqwest::Method::POST,
                    "/v1/rewrap/batch",
                    &creds,
                    Some(json!({"items": items})),
                    "rewrap batch",
                )
                .await;
            if status != StatusCode::OK {
                picked.iter().map(|_| (false, body.clone())).collect()
            } else {
                body["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|item| (item.get("error").is_none(), item.clone()))
                    .collect()
            }
        };
        for (h, (ok, body)) in picked.into_iter().zip(answers) {
            self.check_read(r, h, ok, &body, "rewrap");
            if ok {
                // The platform replaces what it held with the rewrapped one.
                let enc = self.held[h].enc;
                let data = self.held[h].data.clone();
                let new = self.hold(enc, data, &body, "rewrap");
                let moved = self.held.swap_remove(new);
                let row = self.held[h].row;
                self.held[h] = Held { row, ..moved };
                self.update_row(h).await;
            }
        }
    }

    async fn rotate(&mut self) {
        let r = self.rng.below(2);
        let enc = self.rng.below(self.encs.len());
        let creds = self.creds.clone();
        let body = json!({"encryptionId": self.encs[enc].id});
        let (status, answer) = self
            .call(
                r,
                reqwest::Method::POST,
                "/v1/rotate",
                &creds,
                Some(body),
                "rotate",
            )
            .await;
        match status {
            StatusCode::OK => {
                let e = &mut self.encs[enc];
                let old = e.active();
                e.versions[old].set(State::Enabled);
                e.versions.push(Version {
                    id: answer["newVersionId"]
                        .as_str()
                        .unwrap()
                        .to_ascii_lowercase(),
                    history: vec![(Instant::now(), State::Active)],
                    disabled: None,
                    forced: false,
                });
            }
            _ => assert!(
                self.may_be_unavailable(r, &answer),
                "{}: rotate refused: {status} {answer}",
                self.ctx("rotate")
            ),
        }
    }

    /// A version of `enc` that is neither active nor destroyed.
    fn pick_retired(&mut self, enc: usize) -> Option<usize> {
        let candidates: Vec<usize> = self.encs[enc]
            .versions
            .iter()
            .enumerate()
            .filter(|(_, v)| !matches!(v.state(), State::Active | State::Destroyed))
            .map(|(i, _)| i)
            .collect();
        if candidates.is_empty() {
            None
        } else {
            Some(candidates[self.rng.below(candidates.len())])
        }
    }

    async fn patch_version(
        &mut self,
        r: usize,
        enc: usize,
        v: usize,
        body: Value,
        what: &str,
    ) -> (StatusCode, Value) {
        let path = format!(
            "/v1/encryptions/{}/versions/{}",
            self.encs[enc].id, self.encs[enc].versions[v].id
        );
        let creds = self.creds.clone();
        self.call(r, reqwest::Method::PATCH, &path, &creds, Some(body), what)
            .await
    }

    async fn set_state(&mut self) {
        let r = self.rng.below(2);
        let enc = self.rng.below(self.encs.len());
        let Some(v) = self.pick_retired(enc) else {
            return;
        };
        let current = self.encs[enc].versions[v].state();
        // Disable more often than not, so that destroys have something to do.
        let choices: Vec<State> = [
            State::Disabled,
            State::Disabled,
            State::Enabled,
            State::DecryptOnly,
        ]
        .into_iter()
        .filter(|s| *s != current)
        .collect();
        let target = choices[self.rng.below(choices.len())];
        let sent = Instant::now();
        let (status, answer) = self
            .patch_version(r, enc, v, json!({"state": target.name()}), "set_state")
            .await;
        match status {
            StatusCode::OK => {
                let version = &mut self.encs[enc].versions[v];
                let shown = answer["versions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["versionId"] == version.id.as_str())
                    .unwrap()["state"]
                    .clone();
                assert_eq!(shown, target.name(), "step {}: {answer}", self.step);
                version.set(target);
                version.disabled = (target == State::Disabled).then(|| (sent, Instant::now()));
            }
            _ => assert!(
                self.may_be_unavailable(r, &answer),
                "{}: {} refused: {status} {answer}",
                self.ctx("set_state"),
                target.name()
            ),
        }
    }

    /// Destroy without `force` is checked against the model: it may succeed
    /// only for a version disabled for the grace period that the last job
    /// over its table found no row on; each refusal must have its reason.
    async fn destroy(&mut self, force: bool) {
        let r = self.rng.below(2);
        let enc = self.rng.below(self.encs.len());
        let Some(v) = self.pick_retired(enc) else {
            return;
        };
        let body = if force {
            json!({"state": "destroyed", "force": true})
        } else {
            json!({"state": "destroyed"})
        };
        let sent = Instant::now();
        let (status, answer) = self.patch_version(r, enc, v, body, "destroy").await;
        let answered = Instant::now();
        let version = &self.encs[enc].versions[v];
        let (state, disabled) = (version.state(), version.disabled);
        let rows_found = self.encs[enc]
            .last_job
            .as_ref()
            .and_then(|j| j.rows_on.get(&version.id))
            .cloned()
            .unwrap_or_default();
        let code = answer["error"]["code"].as_str().unwrap_or_default();
        let ctx = self.ctx(if force { "destroy force" } else { "destroy" });
        if status != StatusCode::OK {
            *self
                .tally
                .refused_destroys
                .entry(code.to_string())
                .or_insert(0) += 1;
            assert!(
                !force || self.may_be_unavailable(r, &answer),
                "{ctx}: force refused: {answer}"
            );
            match code {
                "version_not_disabled" => assert_ne!(
                    state,
                    State::Disabled,
                    "{ctx}: a disabled version was called not disabled"
                ),
                "destroy_grace_pending" => {
                    let (_, disabled_at) = disabled.unwrap_or_else(|| {
                        panic!("{ctx}: grace pending for a version not disabled")
                    });
                    assert!(
                        sent.duration_since(disabled_at) < GRACE + Duration::from_secs(1),
                        "{ctx}: grace still pending {:?} after the disable",
                        sent.duration_since(disabled_at)
                    );
                }
                // No job over the encryption ended after the version stopped
                // being active: wrong only if the last one began after that.
                "version_unverified" => {
                    let retired = version
                        .history
                        .windows(2)
                        .find(|w| w[0].1 == State::Active)
                        .map(|w| w[1].0);
                    let job_started = self.encs[enc].last_job.as_ref().map(|j| j.started);
                    assert!(
                        !matches!((retired, job_started), (Some(r), Some(j)) if j > r),
                        "{ctx}: version_unverified, but a job began after the version was retired: {answer}"
                    );
                }
                "version_in_use" => assert!(
                    !rows_found.is_empty(),
                    "{ctx}: version_in_use, but the last job over the table found no row on it: {answer}"
                ),
                "not_ready" | "unavailable" => assert!(!self.settled(r), "{ctx}: {answer}"),
                _ => panic!("{ctx}: unexpected refusal {status} {answer}"),
            }
            return;
        }
        if !force {
            let (disabled_sent, _) = disabled
                .unwrap_or_else(|| panic!("{ctx}: destroyed a version that was not disabled"));
            assert_eq!(state, State::Disabled, "{ctx}");
            assert!(
                answered.duration_since(disabled_sent) >= GRACE,
                "{ctx}: destroyed {:?} after the disable, within the grace period",
                answered.duration_since(disabled_sent)
            );
            assert!(
                rows_found.is_empty(),
                "{ctx}: destroyed without force while the last job over its table found rows {rows_found:?} on it"
            );
        }
        let version = &mut self.encs[enc].versions[v];
        let id = version.id.clone();
        version.set(State::Destroyed);
        version.forced = force;
        if force {
            self.tally.forced += 1;
            return;
        }
        self.tally.destroys += 1;
        // What the destroy shreds that the guard could not know of: loose
        // ciphertexts, and rows written after the last job over the table.
        for held in self.held.iter_mut().filter(|h| h.enc == enc) {
            if held.ct["encryptionVersionId"]
                .as_str()
                .unwrap()
                .to_ascii_lowercase()
                == id
            {
                held.unseen_loss = true;
                match held.row {
                    Some(_) => self.tally.unseen_rows += 1,
                    None => self.tally.unseen_loose += 1,
                }
            }
        }
    }

    /// A re-encryption job over one encryption's table, to its end; then the
    /// table is read back (the job changed it) and what it holds per version
    /// becomes what the guard may know.
    async fn job(&mut self) {
        if self.cut_until.is_some() {
            self.restore_cut().await;
        }
        let r = self.rng.below(2);
        let enc = self.rng.below(self.encs.len());
        let started = Instant::now();
        let mut source = self.platform.source();
        source["table"] = json!(self.encs[enc].table);
        let creds = self.creds.clone();
        let body =
            json!({"kind": "reencrypt", "encryptionId": self.encs[enc].id, "source": source});
        let (status, created) = self
            .call(
                r,
                reqwest::Method::POST,
                "/v1/jobs",
                &creds,
                Some(body),
                "job",
            )
            .await;
        if status != StatusCode::ACCEPTED {
            assert!(
                self.may_be_unavailable(r, &created),
                "{}: job refused: {status} {created}",
                self.ctx("job")
            );
            return;
        }
        let job = created["jobId"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(90);
        let done = loop {
            let r = self.rng.below(2);
            let (status, view) = self
                .call(
                    r,
                    reqwest::Method::GET,
                    &format!("/v1/jobs/{job}"),
                    &creds,
                    None,
                    "job status",
                )
                .await;
            if status == StatusCode::OK {
                match view["state"].as_str().unwrap() {
                    "succeeded" => break view,
                    "failed" | "cancelled" => panic!("{}: job ended as {view}", self.ctx("job")),
                    _ => {}
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}: job not finished: {view}",
                self.ctx("job")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let rows = sqlx::query(&format!(
            "SELECT id, cipher_text, version, metadata FROM {}",
            self.encs[enc].table
        ))
        .fetch_all(&mut self.db)
        .await
        .unwrap();
        let mut rows_on: HashMap<String, Vec<i64>> = HashMap::new();
        let mut by_id: HashMap<i64, Value> = HashMap::new();
        for row in rows {
            let (id, ct, version, metadata): (i64, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            rows_on
                .entry(version.to_ascii_lowercase())
                .or_default()
                .push(id);
            by_id.insert(
                id,
                json!({"encryptionId": self.encs[enc].id, "cipherText": ct, "encryptionVersionId": version,
                       "metadata": serde_json::from_str::<Value>(&metadata).unwrap()}),
            );
        }
        // The job's report agrees with the table: every version but one (the
        // active one when it ended) under its count.
        let remaining = done["remainingByVersion"].as_object().unwrap();
        for (v, n) in remaining {
            assert_eq!(
                rows_on.get(v).map_or(0, |r| r.len() as i64),
                n.as_i64().unwrap(),
                "{}: the job reports {n} rows on {v}: {done}",
                self.ctx("job")
            );
        }
        assert!(
            rows_on
                .keys()
                .filter(|v| !remaining.contains_key(*v))
                .count()
                <= 1,
            "{}: the job left rows on old versions unreported: {done}",
            self.ctx("job")
        );
        for h in 0..self.held.len() {
            let Some(id) = self.held[h].row else { continue };
            if self.held[h].enc != enc {
                continue;
            }
            let ct = by_id[&id].clone();
            let version = ct["encryptionVersionId"].as_str().unwrap().to_string();
            if !version.eq_ignore_ascii_case(self.held[h].version()) {
                // Moved: under a version that was active within the lag bound.
                assert!(
                    self.may_encrypt_with(enc, &version),
                    "{}: the job moved a row to {version}, not an active version",
                    self.ctx("job")
                );
            }
            self.held[h].ct = ct;
        }
        self.encs[enc].last_job = Some(JobFinding { rows_on, started });
    }

    /// A root-KEK rotation through the operator's route: refused with `409
    /// master_key_changed` on a replica still on the master key a migration
    /// replaced, accepted (or `409 rotation_in_progress`) on the others.
    async fn root_kek(&mut self) {
        let r = self.rng.below(2);
        let operator = self.operator.clone();
        let (status, body) = self
            .call(
                r,
                reqwest::Method::POST,
                "/v1/admin/root-kek/rotate",
                &operator,
                Some(json!({})),
                "root-KEK rotation",
            )
            .await;
        let code = body["error"]["code"].as_str().unwrap_or_default();
        if self.apps[r].master_key != self.db_key {
            // `rotation_in_progress` if a rotation was unfinished when the
            // migration ran: refused either way, never started.
            assert!(
                code == "master_key_changed"
                    || code == "rotation_in_progress"
                    || self.may_be_unavailable(r, &body),
                "{}: a replica on the replaced master key answered {status} {body}",
                self.ctx("root-KEK rotation")
            );
            return;
        }
        match status {
            StatusCode::ACCEPTED => {
                self.tally.root_kek_rotations += 1;
                for other in 0..2 {
                    if self.apps[other].master_key != self.db_key {
                        self.stranded[other] = true;
                    }
                }
            }
            StatusCode::CONFLICT if code == "rotation_in_progress" => return,
            _ => {
                assert!(
                    self.may_be_unavailable(r, &body),
                    "{}: {status} {body}",
                    self.ctx("root-KEK rotation")
                );
                return;
            }
        }
        if self.rng.chance(0.5) {
            self.root_kek_done(r, Duration::from_secs(30)).await;
        }
    }

    /// Waits until one root KEK is left and the rotation is `done`.
    async fn root_kek_done(&mut self, r: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let operator = self.operator.clone();
        loop {
            let (status, st) = self
                .call(
                    r,
                    reqwest::Method::GET,
                    "/v1/admin/root-kek",
                    &operator,
                    None,
                    "root-KEK status",
                )
                .await;
            if status == StatusCode::OK {
                assert_ne!(
                    st["rotation"],
                    "stalled",
                    "{}: {st}",
                    self.ctx("root-KEK status")
                );
                if st["rotation"] == "done" && st["rootKeks"].as_array().unwrap().len() == 1 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}: the root-KEK rotation did not finish: {st}",
                self.ctx("root-KEK status")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `keyward master-key migrate --to env` to a new key, while both
    /// replicas keep running on the old one until a restart step.
    async fn migrate(&mut self) {
        if self.apps.iter().any(|a| a.master_key != self.db_key) {
            return; // one migration at a time: the last is not rolled out yet
        }
        let new_key = random_master_key();
        let out = keyward_command()
            .args(["master-key", "migrate", "--to", "env"])
            .env("KEYWARD_DATABASE_URL", &self.apps[0].db.url)
            .env("KEYWARD_MASTER_KEY", &self.db_key)
            .env("KEYWARD_NEW_MASTER_KEY", &new_key)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked"),
            "{}: {stderr}",
            self.ctx("migrate")
        );
        assert!(!stderr.contains(&self.db_key) && !stderr.contains(&new_key));
        if out.status.success() {
            self.db_key = new_key;
            self.tally.migrations += 1;
        } else {
            // Only a root-KEK rotation in between may make it fail, and then
            // nothing changed.
            self.tally.failed_migrations += 1;
            assert!(
                stderr.contains("again") || stderr.contains("rotation"),
                "{}: migrate failed: {stderr}",
                self.ctx("migrate")
            );
        }
    }

    /// Restarts one replica (SIGTERM or SIGKILL), with the master key the
    /// database holds now: after a migration, that is the new one.
    async fn restart(&mut self) {
        if self.cut_until.is_some() {
            self.restore_cut().await;
        }
        let r = self.rng.below(2);
        let kill = self.rng.chance(0.5);
        self.restart_replica(r, kill);
    }

    fn restart_replica(&mut self, r: usize, kill: bool) {
        let app = &mut self.apps[r];
        if kill {
            let pid = app.pid();
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap();
            app.kill_wait();
        } else {
            app.stop();
        }
        app.master_key = self.db_key.clone();
        app.start();
        self.stranded[r] = false;
        self.settling[r] = Instant::now() + SETTLE;
    }

    /// Cuts replica B's database connection (PostgreSQL) for 1.5 to 4 s; the
    /// steps go on meanwhile, and it is restored by a later step.
    async fn cut(&mut self) {
        if self.backend != Backend::Postgres || self.cut_until.is_some() {
            return;
        }
        self.forwarder.as_mut().unwrap().stop();
        let ms = 1500 + self.rng.below(2500) as u64;
        self.cut_until = Some(Instant::now() + Duration::from_millis(ms));
    }

    async fn restore_cut(&mut self) {
        if let Some(until) = self.cut_until.take() {
            if let Some(wait) = until.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            self.forwarder.as_mut().unwrap().resume().await;
            self.settling[1] = Instant::now() + SETTLE;
        }
    }

    /// The end: both replicas on the current master key, every root-KEK
    /// rotation finished, every disabled version enabled again (disabled is
    /// reversible), and then every held ciphertext decrypts on both
    /// replicas, unless a destroy took its version.
    async fn finish(&mut self) {
        self.restore_cut().await;
        for r in 0..2 {
            if self.apps[r].master_key != self.db_key {
                self.restart_replica(r, false);
            }
        }
        // Wait for both replicas to serve.
        for r in 0..2 {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let (status, _) = send(self.apps[r].client.get(self.apps[r].url("/readyz"))).await;
                if status == StatusCode::OK {
                    break;
                }
                assert!(Instant::now() < deadline, "replica {r} never ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            self.settling[r] = Instant::now();
        }
        self.root_kek_done(0, Duration::from_secs(60)).await;
        for enc in 0..self.encs.len() {
            for v in 0..self.encs[enc].versions.len() {
                if self.encs[enc].versions[v].state() == State::Disabled {
                    let (status, body) = self
                        .patch_version(0, enc, v, json!({"state": "enabled"}), "re-enable")
                        .await;
                    assert_eq!(status, StatusCode::OK, "{body}");
                    self.encs[enc].versions[v].set(State::Enabled);
                }
            }
        }
        tokio::time::sleep(STALE).await;

        let mut expect_ok = vec![];
        let mut expect_gone = vec![];
        for (h, held) in self.held.iter().enumerate() {
            let e = &self.encs[held.enc];
            let v = &e.versions[e.version(held.version())];
            if v.state() == State::Destroyed {
                assert!(
                    v.forced || held.unseen_loss,
                    "a held ciphertext's version was destroyed unnoticed"
                );
                expect_gone.push(h);
            } else {
                expect_ok.push(h);
            }
        }
        for r in 0..2 {
            for chunk in expect_ok.chunks(500).chain(expect_gone.chunks(500)) {
                let items: Vec<Value> = chunk.iter().map(|h| self.held[*h].ct.clone()).collect();
                let creds = self.creds.clone();
                let (status, body) = self
                    .call(
                        r,
                        reqwest::Method::POST,
                        "/v1/decrypt/batch",
                        &creds,
                        Some(json!({"items": items})),
                        "final decrypt",
                    )
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                for (h, result) in chunk.iter().zip(body["results"].as_array().unwrap()) {
                    let held = &self.held[*h];
                    if expect_gone.contains(h) {
                        assert_eq!(
                            result["error"]["code"], "version_destroyed",
                            "replica {r}: a ciphertext under a destroyed version: {result}"
                        );
                    } else {
                        assert_eq!(
                            result["data"].as_str(),
                            Some(held.data.as_str()),
                            "replica {r}: an acknowledged ciphertext (row {:?}, version {}) no longer decrypts: {result}",
                            held.row,
                            held.version()
                        );
                    }
                }
            }
        }
        println!(
            "integrity schedule: {} held ciphertexts decrypt on both replicas, {} were destroyed ({} by force)",
            expect_ok.len(),
            expect_gone.len(),
            expect_gone
                .iter()
                .filter(|h| {
                    let held = &self.held[**h];
                    let e = &self.encs[held.enc];
                    e.versions[e.version(held.version())].forced
                })
                .count()
        );
    }
}

/// Found by the schedule (seed 3766025441060773630 on SQLite): after a
/// master-key migration, replica A restarts with the new key and rotates the
/// root KEK; replica B, still on the old key, cannot unwrap the new KEK. It
/// used to keep serving from its stale root keys: a rotate wrapped the new
/// version under the deleted KEK (500, a foreign-key failure) and a version
/// re-wrapped under the new KEK failed to load (500). Now B stops serving key
/// operations with `503 not_ready` (and `/readyz` says why) until it is
/// restarted with the new key, and then everything decrypts.
async fn integrity_a_replica_on_the_replaced_master_key_stops_once_a_root_kek_it_cannot_unwrap_is_in_use(
    backend: Backend,
) {
    let mut a = TestApp::spawn(backend).await;
    let mut b = a.spawn_replica(&[("KEYWARD_SYNC_INTERVAL", "10s")]);
    let creds = a.create_tenant("acme");
    let operator = a.create_operator();
    let (enc, _) = a.create_encryption(&creds).await;
    let before = a.encrypt(&creds, &enc, "before").await;
    let (cold, _) = a.create_encryption(&creds).await;
    let cold_ct = a.encrypt(&creds, &cold, "cold").await;

    let new_key = random_master_key();
    crate::providers::migrate(
        &a,
        &[("KEYWARD_NEW_MASTER_KEY".into(), new_key.clone())],
        "env",
    );
    // A migration alone: B keeps serving with the KEKs it holds.
    let (status, body) = b.decrypt(&creds, &before).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    a.stop();
    a.master_key = new_key.clone();
    a.start();
    let (status, body) = a
        .post("/v1/admin/root-kek/rotate", &operator, &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = a.get("/v1/admin/root-kek", &operator).await;
        if st["rotation"] == "done" && st["rootKeks"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // B cannot follow: every key operation is a clear 503, never a 500,
    // also when B first meets the new KEK on a ring miss (the cold
    // encryption, never loaded on B, is now under the new KEK), before its
    // change feed (read every 10 s here; on PostgreSQL NOTIFY may come first)
    // told it of the rotation.
    let (status, body) = b.decrypt(&creds, &cold_ct).await;
    crate::helpers::assert_error(status, &body, 503, "not_ready");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = b
            .post("/v1/rotate", &creds, &json!({"encryptionId": enc}))
            .await;
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        if status == StatusCode::SERVICE_UNAVAILABLE {
            crate::helpers::assert_error(status, &body, 503, "not_ready");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B kept rotating: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (path, body) in [
        ("/v1/decrypt", decrypt_body(&cold_ct)),
        ("/v1/decrypt", decrypt_body(&before)),
        ("/v1/encrypt", json!({"encryptionId": enc, "data": "x"})),
        ("/v1/encryptions", json!({})),
    ] {
        let (status, body) = b.post(path, &creds, &body).await;
        crate::helpers::assert_error(status, &body, 503, "not_ready");
    }
    let (status, body) = send(b.client.get(b.url("/readyz"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("master key changed"),
        "{body}"
    );

    // Restarted with the new key, B serves again and everything decrypts.
    b.stop();
    b.master_key = new_key;
    b.start();
    for (ct, data) in [(&before, "before"), (&cold_ct, "cold")] {
        let (status, body) = b.decrypt(&creds, ct).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], data);
    }
    b.rotate(&creds, &enc).await;
}
