//! Heap allocations per encrypt and decrypt request through the real router
//! and edge, every request audited (issue #25): a counting global allocator
//! (the only unsafe code, kept out of the library, which forbids it) counts
//! every allocation and reallocation in the process, the audit writer's and
//! the tracing subscriber's included, while prebuilt requests are answered
//! one after another. Run with `--nocapture` to see the figures;
//! `bench/run` prints them too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::{json, Value};

use keyward::audit::{AuditLog, CheckpointSettings, Destination};
use keyward::domain::guard::{AuthGuard, GuardSettings};
use keyward::domain::service::KeyService;
use keyward::http::{router, AppParts, AppState, BatchLimits, Edge, RouterSettings};

/// Counts allocations and reallocations, and hands them to the system
/// allocator.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds
// `GlobalAlloc`'s contract; the counter is an atomic and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The router as `serve` builds it (JSON logs at `info`, the metrics
/// recorder, an audit file), a tenant's credentials and an encryption.
struct Api {
    edge: Edge,
    state: AppState,
    key: String,
    secret: String,
    encryption: String,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start() -> Api {
        keyward::telemetry::init(keyward::telemetry::LogFormat::Json, "info");
        let _ = keyward::http::metrics::install_metrics_recorder();
        let dir = tempfile::tempdir().unwrap();
        let store = keyward::store::Store::connect("sqlite::memory:", 1)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let provider =
            keyward::master_key::EnvMasterKey::new(&keyward::crypto::DataKey::generate());
        let service = Arc::new(KeyService::new(store, Arc::new(provider), 1000));
        service.load_root_keys().await.unwrap();
        let tenant = keyward::domain::accounts::create_tenant(service.store(), "acme")
            .await
            .unwrap();
        let audit = AuditLog::start(
            &Destination::File(dir.path().join("audit.jsonl")),
            Some(service.store().clone()),
            CheckpointSettings::default(),
        )
        .unwrap();
        let state = AppState::new(AppParts {
            audit,
            service,
            guard: Arc::new(AuthGuard::new(GuardSettings {
                rate_limit: 0,
                max_failures: 10,
                window: Duration::from_secs(60),
                unauthenticated_rate_limit: 0,
                audit_refused_per_minute: 10,
            })),
            certificate: Default::default(),
        });
        let settings = RouterSettings {
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(10),
            batch: BatchLimits {
                max_items: 1000,
                max_body_bytes: 16 << 20,
            },
            max_concurrent_body_bytes: 16 << 20,
            stream: keyward::http::StreamLimits {
                max_concurrent: 16,
                read_timeout: Duration::from_secs(30),
            },
        };
        let mut api = Api {
            edge: router(state.clone(), settings),
            state,
            key: tenant.credential.key_id.clone(),
            secret: tenant.credential.secret.to_string(),
            encryption: String::new(),
            _dir: dir,
        };
        let (status, body) = api.call("/v1/encryptions", &json!({})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        api.encryption = body["encryptionId"].as_str().unwrap().to_string();
        api
    }

    fn request(&self, path: &str, body: &Value) -> Request<Body> {
        Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("x-api-key", &self.key)
            .header("x-api-secret", &self.secret)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    async fn call(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self
            .edge
            .clone()
            .handle(self.request(path, body), peer(), None)
            .await;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Allocations per request of `n` copies of `body` to `path`, answered
    /// one after another, each audited (the writer's work included).
    async fn allocations_per_request(&self, path: &str, body: &Value, n: usize) -> f64 {
        // Warm: the key ring, the metrics series, the writer's buffers.
        for _ in 0..200 {
            let (status, answer) = self.call(path, body).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
        }
        self.state.audit.flush().await;
        let requests: Vec<Request<Body>> = (0..n).map(|_| self.request(path, body)).collect();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for request in requests {
            let response = self.edge.clone().handle(request, peer(), None).await;
            assert_eq!(response.status(), StatusCode::OK);
            drop(response);
        }
        self.state.audit.flush().await;
        let after = ALLOCATIONS.load(Ordering::Relaxed);
        (after - before) as f64 / n as f64
    }
}

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}

/// The figures, and the bound they must stay under.
#[tokio::test(flavor = "current_thread")]
async fn encrypt_and_decrypt_allocate_little_per_request() {
    let api = Api::start().await;
    let n = 2000;
    let mut worst: f64 = 0.0;
    for size in [64, 1024] {
        let data = "a".repeat(size);
        let encrypt = json!({"encryptionId": api.encryption, "data": data});
        let (status, encrypted) = api.call("/v1/encrypt", &encrypt).await;
        assert_eq!(status, StatusCode::OK, "{encrypted}");
        let decrypt = json!({
            "encryptionId": encrypted["encryptionId"],
            "cipherText": encrypted["cipherText"],
            "encryptionVersionId": encrypted["encryptionVersionId"],
            "metadata": encrypted["metadata"],
        });
        let e = api
            .allocations_per_request("/v1/encrypt", &encrypt, n)
            .await;
        let d = api
            .allocations_per_request("/v1/decrypt", &decrypt, n)
            .await;
        println!("allocations per request: encrypt {size} B {e:.1}, decrypt {size} B {d:.1}");
        worst = worst.max(e).max(d);
    }
    assert!(worst <= BOUND, "{worst} allocations per request");
}

/// What a request may allocate, at most, on average.
const BOUND: f64 = 10.0;
