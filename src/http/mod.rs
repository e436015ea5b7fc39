//! The HTTP layer: one file per resource with its handlers; every route
//! declared once in [`routes::ROUTES`] (method, path, scope, body limit,
//! audited operation), from which the router is built here, behind [`Edge`]
//! (request ids, tracing, body limit, time limit, panic catching, audit,
//! metrics, JSON errors for everything). The edge answers `POST /v1/encrypt`
//! and `POST /v1/decrypt` itself, with the same route layer and handlers
//! (`routes::hot`), without the router's per-request boxes.
//!
//! Inside the layer, files import downwards only: `error` and `state`;
//! `audit_note`; `extract`, `query` and `metrics`; the resources (`contract`,
//! `batch`, `encryptions`, `jobs`, `admin`, `audit`, `ops`); `edge`; `routes`;
//! `openapi`; this file.

mod accounts;
mod admin;
mod audit;
mod audit_note;
mod batch;
mod contract;
mod datakeys;
mod edge;
mod encryptions;
pub mod error;
pub mod extract;
mod jobs;
mod keys;
pub mod metrics;
pub mod openapi;
mod ops;
mod query;
mod routes;
mod search;
mod secret;
mod state;
mod stream;

use std::time::Duration;

use axum::Router;

pub use edge::Streamed;

/// The API behind what every request passes through, with its hot routes.
pub type Edge = edge::Edge<routes::Hot>;

/// Entry points for the fuzz targets (`fuzz/`, through `crate::fuzzing`),
/// compiled only with the `fuzzing` feature.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use crate::http::extract::parse_json;
    use crate::http::query::parse;
    use crate::http::{accounts, audit, batch, contract, encryptions, jobs};

    /// `bytes` as the body of every route that takes one, parsed as the
    /// route's extractor parses it (and a decrypt body, and each batch item
    /// as the single call's input, as far as the handler goes before a key).
    pub fn request_body(bytes: &[u8]) {
        let _ = parse_json::<contract::EncryptRequest>(bytes);
        contract::parse_decrypt_body(bytes);
        let _ = parse_json::<contract::RotateRequest>(bytes);
        if let Ok(batch) = parse_json::<batch::BatchRequest>(bytes) {
            for item in batch.items() {
                let _ = parse_json::<contract::EncryptRequest>(item.get().as_bytes());
                contract::parse_decrypt_body(item.get().as_bytes());
            }
        }
        let _ = parse_json::<encryptions::CreateRequest>(bytes);
        let _ = parse_json::<encryptions::VersionStateRequest>(bytes);
        let _ = parse_json::<serde_json::Map<String, serde_json::Value>>(bytes);
        let _ = parse_json::<jobs::CreateJobRequest>(bytes);
        let _ = parse_json::<accounts::CreateTenantRequest>(bytes);
        let _ = parse_json::<accounts::CreateApiKeyRequest>(bytes);
    }

    /// `query` as the query string of every route that reads one.
    pub fn query_string(query: &str) {
        let _ = parse::<encryptions::ListParams>(query);
        let _ = parse::<audit::AuditParams>(query);
        let _ = parse::<accounts::TenantParams>(query);
        let _ = parse::<accounts::ApiKeyParams>(query);
    }
}
use error::ApiError;
pub use state::{AppParts, AppState, BatchLimits, RouterSettings, StreamLimits};

/// The whole API ([`routes::ROUTES`]), with what every request passes through.
pub fn router(state: AppState, settings: RouterSettings) -> Edge {
    ops::DOCUMENT.get_or_init(openapi::document);
    let bodies = edge::BodyBudget::new(settings.max_concurrent_body_bytes);
    let with = Some((&settings, &bodies));
    let routes = routes::build(&state, with, settings.request_timeout, |_| true);
    let hot = routes::hot(&state, &settings, &bodies);
    behind_edge(routes, hot, state, Some(settings.max_body_bytes))
}

/// The operational endpoints alone (health, readiness, metrics), for a
/// separate plain-HTTP listener that probes can reach without a client
/// certificate.
pub fn ops_router(state: AppState, request_timeout: Duration) -> Edge {
    let routes = routes::build(&state, None, request_timeout, |r| r.on_ops_listener);
    behind_edge(routes, Vec::new(), state, None)
}

/// `routes` with the fallbacks and the state, behind an [`Edge`] that
/// answers the `hot` routes itself.
fn behind_edge(
    routes: Router<AppState>,
    hot: Vec<edge::HotRoute<routes::Hot>>,
    state: AppState,
    body_limit: Option<usize>,
) -> Edge {
    let router = routes
        .fallback(edge::not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state.clone());
    Edge::new(router, hot, body_limit, state.guard.clone())
}

#[cfg(test)]
mod tests {
    //! In-process tests: the real router behind the real edge, built once per
    //! test and called with `tower::ServiceExt::oneshot` (inside
    //! [`Edge::handle`]): no process, no listener, a key service over an
    //! in-memory SQLite database and an audit file in a temporary folder. They
    //! check what needs no server: the route table against the router, the
    //! OpenAPI document and the audit log; and request parsing's stable error
    //! codes. (Inline, because a test may reach the store and
    //! `scripts/layers.py` leaves inline test modules out.)

    use std::collections::BTreeSet;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{header, Method, Request, StatusCode};
    use serde_json::{json, Value};

    use super::routes::{Route, ROUTES};
    use super::{router, AppParts, AppState, BatchLimits, Edge, RouterSettings};
    use crate::domain::guard::{AuthGuard, GuardSettings};
    use crate::domain::service::KeyService;

    /// The settings of the router under test: small limits, to reach them.
    const SETTINGS: RouterSettings = RouterSettings {
        max_body_bytes: 4096,
        request_timeout: Duration::from_secs(10),
        batch: BatchLimits {
            max_items: 3,
            max_body_bytes: 16 * 1024,
        },
        max_concurrent_body_bytes: 16 * 1024,
        stream: super::StreamLimits {
            max_concurrent: 2,
            read_timeout: Duration::from_secs(10),
        },
    };

    /// The router, what it stands on, and a tenant's all-scopes credentials.
    struct TestApi {
        edge: Edge,
        state: AppState,
        key: String,
        secret: String,
        operator: (String, String),
        audit_file: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    /// An answer: status, headers and the body as JSON (`Null` when empty).
    struct Answer {
        status: StatusCode,
        headers: axum::http::HeaderMap,
        body: Value,
    }

    impl TestApi {
        async fn start() -> TestApi {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::Store::connect("sqlite::memory:", 1)
                .await
                .unwrap();
            store.migrate().await.unwrap();
            let provider =
                crate::master_key::EnvMasterKey::new(&crate::crypto::DataKey::generate());
            let service = Arc::new(KeyService::new(store, Arc::new(provider), 64));
            service.load_root_keys().await.unwrap();
            let tenant = crate::domain::accounts::create_tenant(service.store(), "acme")
                .await
                .unwrap();
            let operator = crate::domain::accounts::create_operator_key(
                service.store(),
                crate::domain::apikeys::Scopes::operator_all(),
                None,
            )
            .await
            .unwrap();
            let audit_file = dir.path().join("audit.jsonl");
            let destination = crate::audit::Destination::File(audit_file.clone());
            let state = AppState::new(AppParts {
                certificate: Default::default(),
                audit: crate::audit::AuditLog::start(
                    &destination,
                    None,
                    crate::audit::CheckpointSettings::default(),
                )
                .unwrap(),
                service,
                guard: Arc::new(AuthGuard::new(GuardSettings {
                    rate_limit: 0,
                    max_failures: 1_000_000,
                    window: Duration::from_secs(60),
                    unauthenticated_rate_limit: 0,
                    audit_refused_per_minute: 1_000_000,
                })),
            });
            TestApi {
                edge: router(state.clone(), SETTINGS),
                state,
                key: tenant.credential.key_id.clone(),
                secret: tenant.credential.secret.to_string(),
                operator: (operator.key_id.clone(), operator.secret.to_string()),
                audit_file,
                _dir: dir,
            }
        }

        /// Sends `req` through the edge, as the server does.
        async fn send(&self, req: Request<Body>) -> Answer {
            let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
            let response = self.edge.clone().handle(req, peer, None).await;
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
            };
            Answer {
                status,
                headers,
                body,
            }
        }

        /// A request with the tenant's credentials.
        fn authed(&self, method: Method, uri: &str) -> axum::http::request::Builder {
            Request::builder()
                .method(method)
                .uri(uri)
                .header("x-api-key", &self.key)
                .header("x-api-secret", &self.secret)
        }

        /// A request with the credentials `route` takes: the operator's on
        /// operator routes, the tenant's on the others.
        fn authed_for(&self, route: &Route, uri: &str) -> axum::http::request::Builder {
            if matches!(route.scope, Some(super::extract::Requirement::Operator(_))) {
                Request::builder()
                    .method(route.method.clone())
                    .uri(uri)
                    .header("x-api-key", &self.operator.0)
                    .header("x-api-secret", &self.operator.1)
            } else {
                self.authed(route.method.clone(), uri)
            }
        }

        /// `method uri` with the tenant's credentials and a JSON body.
        async fn call(&self, method: Method, uri: &str, body: &Value) -> Answer {
            let req = self
                .authed(method, uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            self.send(req).await
        }

        /// `GET uri` with the tenant's credentials.
        async fn get(&self, uri: &str) -> Answer {
            self.send(self.authed(Method::GET, uri).body(Body::empty()).unwrap())
                .await
        }

        /// The operation of every audit record written so far, in order.
        async fn audited_operations(&self) -> Vec<String> {
            self.state.audit.flush().await;
            let text = std::fs::read_to_string(&self.audit_file).unwrap_or_default();
            crate::audit::read_records(&text)
                .into_iter()
                .map(|record| record.unwrap().operation)
                .collect()
        }
    }

    impl Answer {
        /// Asserts an error answer: status, JSON content type, code.
        #[track_caller]
        fn is_error(&self, status: u16, code: &str) -> &str {
            assert_eq!(self.status.as_u16(), status, "{}", self.body);
            assert_eq!(
                self.headers[header::CONTENT_TYPE],
                "application/json",
                "{}",
                self.body
            );
            assert_eq!(self.body["error"]["code"], code, "{}", self.body);
            self.body["error"]["message"].as_str().unwrap()
        }
    }

    /// `path` with every `{param}` replaced by a fresh UUID.
    fn concrete(path: &str) -> String {
        path.split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    uuid::Uuid::new_v4().to_string()
                } else {
                    segment.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn the_route_table_and_the_openapi_document_describe_the_same_routes() {
        let document: Value = serde_json::from_str(&super::openapi::document()).unwrap();
        let mut documented = BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let secured = operation["security"]
                    .as_array()
                    .is_some_and(|s| !s.is_empty());
                documented.insert((method.to_uppercase(), path.clone(), secured));
            }
        }
        let table: BTreeSet<(String, String, bool)> = ROUTES
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string(), r.scope.is_some()))
            .collect();
        assert_eq!(
            table, documented,
            "the table's routes (method, path, takes credentials) and the document's differ"
        );
    }

    #[tokio::test]
    async fn every_route_is_served_asks_for_credentials_as_declared_and_is_audited_as_declared() {
        let api = TestApi::start().await;
        let mut expected = Vec::new();
        for route in ROUTES {
            let path = concrete(route.path);
            let methods = if route.method == Method::GET {
                vec![Method::GET, Method::HEAD]
            } else {
                vec![route.method.clone()]
            };
            for method in methods {
                let req = Request::builder()
                    .method(method.clone())
                    .uri(&path)
                    .body(Body::empty())
                    .unwrap();
                let answer = api.send(req).await;
                let what = format!("{method} {path} (route {} {})", route.method, route.path);
                if route.scope.is_some() {
                    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{what}");
                    if method != Method::HEAD {
                        answer.is_error(401, "missing_credentials");
                    }
                } else {
                    assert!(
                        !matches!(answer.status.as_u16(), 401 | 403 | 404 | 405),
                        "{what}: {}",
                        answer.status
                    );
                }
                if method == Method::HEAD {
                    assert_eq!(answer.body, Value::Null, "{what}: HEAD has no body");
                }
                // HEAD is the GET's operation, a read.
                expected.extend(route.operation.map(str::to_string));
            }
        }
        assert_eq!(api.audited_operations().await, expected);
    }

    #[tokio::test]
    async fn tenant_keys_are_refused_on_operator_routes_and_operator_keys_on_tenant_routes() {
        use super::extract::Requirement;
        let api = TestApi::start().await;
        let mut expected = Vec::new();
        for route in ROUTES {
            let Some(requirement) = route.scope else {
                continue;
            };
            let path = concrete(route.path);
            let as_tenant = api
                .authed(route.method.clone(), &path)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{}"))
                .unwrap();
            let as_operator = Request::builder()
                .method(route.method.clone())
                .uri(&path)
                .header("x-api-key", &api.operator.0)
                .header("x-api-secret", &api.operator.1)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{}"))
                .unwrap();
            let what = format!("{} {}", route.method, route.path);
            let tenant = api.send(as_tenant).await;
            let operator = api.send(as_operator).await;
            match requirement {
                Requirement::Operator(_) => {
                    assert_eq!(
                        tenant.is_error(403, "insufficient_scope"),
                        "this API key lacks the `operator` scope",
                        "{what}"
                    );
                    assert_ne!(
                        operator.status,
                        StatusCode::FORBIDDEN,
                        "{what}: {}",
                        operator.body
                    );
                }
                Requirement::Tenant(_) => {
                    operator.is_error(403, "tenant_key_required");
                    assert_ne!(
                        tenant.status,
                        StatusCode::FORBIDDEN,
                        "{what}: {}",
                        tenant.body
                    );
                }
                Requirement::TenantOrOperator(..) => {
                    assert_eq!(tenant.status, StatusCode::OK, "{what}: {}", tenant.body);
                    assert_eq!(operator.status, StatusCode::OK, "{what}: {}", operator.body);
                }
            }
            let operation = route.operation.unwrap().to_string();
            expected.extend([operation.clone(), operation]);
        }
        // One record per call, refused or not, with the route's operation.
        assert_eq!(api.audited_operations().await, expected);
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_are_json_errors_and_not_audited() {
        let api = TestApi::start().await;
        api.get("/v1/nothing-here").await.is_error(404, "not_found");
        api.get("/v1/encrypt")
            .await
            .is_error(405, "method_not_allowed");
        let delete = api.authed(Method::DELETE, "/v1/rotate");
        api.send(delete.body(Body::empty()).unwrap())
            .await
            .is_error(405, "method_not_allowed");
        assert_eq!(api.audited_operations().await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn the_request_id_is_kept_when_acceptable_and_replaced_otherwise() {
        let api = TestApi::start().await;
        let with_id = |id: &str| {
            Request::builder()
                .uri("/healthz")
                .header("x-request-id", id)
                .body(Body::empty())
                .unwrap()
        };
        let kept = api.send(with_id("trace-42")).await;
        assert_eq!(kept.headers["x-request-id"], "trace-42");
        for refused in ["has space", &"x".repeat(129)] {
            let answer = api.send(with_id(refused)).await;
            let id = answer.headers["x-request-id"].to_str().unwrap();
            assert!(id.parse::<uuid::Uuid>().is_ok(), "{refused:?} became {id}");
        }
    }

    #[tokio::test]
    async fn bodies_are_refused_with_stable_codes_before_any_key_is_used() {
        let api = TestApi::start().await;
        let encrypt = |body: &'static str, content_type: &'static str| {
            api.authed(Method::POST, "/v1/encrypt")
                .header(header::CONTENT_TYPE, content_type)
                .body(Body::from(body))
                .unwrap()
        };
        let answer = api.send(encrypt("{", "application/json")).await;
        answer.is_error(400, "malformed_json");
        let answer = api.send(encrypt("[]", "application/json")).await;
        assert_eq!(
            answer.is_error(400, "invalid_request"),
            "the body must be a JSON object"
        );
        let answer = api.send(encrypt("{}", "text/plain")).await;
        answer.is_error(415, "unsupported_media_type");
        let answer = api
            .call(
                Method::POST,
                "/v1/encrypt",
                &json!({"encryptionId": "not-an-id", "data": "secret-value"}),
            )
            .await;
        let message = answer.is_error(400, "invalid_request");
        assert_eq!(message, "`encryptionId`: not a UUID");
        let answer = api
            .call(
                Method::POST,
                "/v1/encrypt",
                &json!({"encryptionId": uuid::Uuid::new_v4(), "data": "x", "colour": "red"}),
            )
            .await;
        assert_eq!(
            answer.is_error(400, "invalid_request"),
            "unknown field `colour`"
        );
        let bad_key = api
            .authed(Method::POST, "/v1/encrypt")
            .header("x-master-key", "not base64 at all")
            .body(Body::from("{}"))
            .unwrap();
        api.send(bad_key).await.is_error(400, "invalid_master_key");
    }

    #[tokio::test]
    async fn each_route_takes_the_body_size_the_table_gives_it() {
        let api = TestApi::start().await;
        // Over the normal limit, under the ciphertext-sized one.
        let big = "A".repeat(SETTINGS.max_body_bytes + 100);
        let id = uuid::Uuid::new_v4();
        let answer = api
            .call(
                Method::POST,
                "/v1/encrypt",
                &json!({"encryptionId": id, "data": big}),
            )
            .await;
        let message = answer.is_error(413, "payload_too_large");
        assert!(
            message.contains(&SETTINGS.max_body_bytes.to_string()),
            "{message}"
        );
        let ciphertext = json!({"encryptionId": id, "cipherText": big,
            "encryptionVersionId": id, "metadata": {"nonce": "AAECAwQFBgcICQoL"}});
        for route in ["/v1/decrypt", "/v1/rewrap"] {
            let answer = api.call(Method::POST, route, &ciphertext).await;
            answer.is_error(404, "encryption_not_found");
        }
        // Batches: their own body limit and item count.
        let item = json!({"encryptionId": id, "data": "x".repeat(3000)});
        let answer = api
            .call(
                Method::POST,
                "/v1/encrypt/batch",
                &json!({"items": [item, item, item]}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        let results = answer.body["results"].as_array().unwrap();
        assert_eq!(results.len(), 3);
        assert_eq!(results[0]["error"]["code"], "encryption_not_found");
        assert!(results[0]["error"]["message"].is_string());
        let answer = api
            .call(
                Method::POST,
                "/v1/encrypt/batch",
                &json!({"items": [item, item, item, item]}),
            )
            .await;
        answer.is_error(413, "too_many_items");
    }

    #[tokio::test]
    async fn bad_query_parameters_are_invalid_request_naming_the_parameter() {
        let api = TestApi::start().await;
        let page = "`limit`: must be an integer from 1 to 1000";
        let cursor = "`cursor`: not a cursor returned by this endpoint";
        for (query, message) in [
            ("limit=0", page),
            ("limit=abc", page),
            ("limit=100000", page),
            ("cursor=garbage", cursor),
            (
                "foo=bar",
                "unknown query parameter (expected `limit` or `cursor`)",
            ),
        ] {
            let answer = api.get(&format!("/v1/encryptions?{query}")).await;
            assert_eq!(answer.is_error(400, "invalid_request"), message, "{query}");
        }
        let operations = crate::audit::OPERATIONS.join(", ");
        for (query, message) in [
            ("limit=0", page.to_string()),
            ("cursor=abc", cursor.to_string()),
            ("cursor=0", cursor.to_string()),
            (
                "operation=steal",
                format!("`operation`: expected one of {operations}"),
            ),
            (
                "from=yesterday",
                "`from`: expected an RFC 3339 time such as 2026-11-23T10:00:00Z".into(),
            ),
            ("encryptionId=x", "`encryptionId`: not a UUID".into()),
            ("tenantId=x", "`tenantId`: not a UUID".into()),
            (
                "colour=red",
                "unknown query parameter (expected `from`, `to`, `tenantId`, `encryptionId`, \
                 `operation`, `limit` or `cursor`)"
                    .into(),
            ),
        ] {
            let answer = api.get(&format!("/v1/audit?{query}")).await;
            assert_eq!(answer.is_error(400, "invalid_request"), message, "{query}");
        }
        // Good parameters pass, in any RFC 3339 offset.
        let answer = api
            .get("/v1/audit?from=2000-01-01T02:00:00%2B02:00&operation=encrypt&limit=5")
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        let answer = api.get("/v1/encryptions?limit=1000").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }

    /// Every audit record written so far, in order.
    async fn audit_records(api: &TestApi) -> Vec<Value> {
        api.state.audit.flush().await;
        let text = std::fs::read_to_string(&api.audit_file).unwrap_or_default();
        crate::audit::read_records(&text)
            .into_iter()
            .map(|record| serde_json::to_value(record.unwrap()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_batch_is_audited_as_one_record_per_encryption_version_and_outcome() {
        let api = TestApi::start().await;
        let created = api.call(Method::POST, "/v1/encryptions", &json!({})).await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
        let enc = created.body["encryptionId"].as_str().unwrap().to_string();
        let missing = uuid::Uuid::new_v4().to_string();
        let item = |id: &str| json!({"encryptionId": id, "data": "x"});
        let answer = api
            .call(
                Method::POST,
                "/v1/encrypt/batch",
                &json!({"items": [item(&enc), item(&missing), item(&enc)]}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        let records = audit_records(&api).await;
        let batch: Vec<&Value> = records.iter().filter(|r| r["items"].is_number()).collect();
        assert_eq!(batch.len(), 2, "{records:#?}");
        assert_eq!(batch[0]["encryptionId"], enc.as_str());
        assert_eq!(
            (&batch[0]["items"], &batch[0]["outcome"]),
            (&json!(2), &json!("ok"))
        );
        assert!(batch[0]["versionId"].is_string());
        assert_eq!(batch[1]["encryptionId"], missing.as_str());
        assert_eq!(batch[1]["error"], "encryption_not_found");
        assert_eq!(
            (&batch[1]["items"], &batch[1]["itemIndexes"]),
            (&json!(1), &json!("1"))
        );
        assert_eq!(batch[0]["requestId"], batch[1]["requestId"]);
    }

    #[tokio::test]
    async fn batches_beyond_the_body_budget_are_refused_with_503_and_retry_after() {
        let api = TestApi::start().await;
        // A batch whose body never ends holds the whole budget (it declares
        // no length, so it counts as the route's limit: all of it).
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
        tx.send(Ok(bytes::Bytes::from_static(b"{\"items\": [")))
            .await
            .unwrap();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        let held = api
            .authed(Method::POST, "/v1/encrypt/batch")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
        let edge = api.edge.clone();
        let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
        let holder = tokio::spawn(edge.handle(held, peer, None));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let batch = json!({"items": [{"encryptionId": uuid::Uuid::new_v4(), "data": "x"}]});
        let busy = api.call(Method::POST, "/v1/encrypt/batch", &batch).await;
        busy.is_error(503, "server_busy");
        assert_eq!(busy.headers[header::RETRY_AFTER], "1");
        // A small single call does not need the budget.
        let single = json!({"encryptionId": uuid::Uuid::new_v4(), "data": "x"});
        let answer = api.call(Method::POST, "/v1/encrypt", &single).await;
        answer.is_error(404, "encryption_not_found");
        // Once the holder is done, its share is back.
        drop(tx);
        let _ = holder.await.unwrap();
        let answer = api.call(Method::POST, "/v1/encrypt/batch", &batch).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        let refused = audit_records(&api)
            .await
            .into_iter()
            .filter(|r| r["error"] == "server_busy")
            .count();
        assert_eq!(refused, 1, "the refusal is audited");
    }

    /// `POST /v1/encrypt` and `/v1/decrypt` are answered by the edge itself
    /// (`edge::HotRoute`): every answer, header and audit record is the
    /// router's, for requests that succeed and for each way to fail.
    #[tokio::test]
    async fn the_edge_answers_encrypt_and_decrypt_exactly_as_the_router_does() {
        let api = TestApi::start().await;
        let bodies = super::edge::BodyBudget::new(SETTINGS.max_concurrent_body_bytes);
        let with = Some((&SETTINGS, &bodies));
        let routes = super::routes::build(&api.state, with, SETTINGS.request_timeout, |_| true);
        let routed = super::behind_edge(
            routes,
            Vec::new(),
            api.state.clone(),
            Some(SETTINGS.max_body_bytes),
        );
        let created = api.call(Method::POST, "/v1/encryptions", &json!({})).await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
        let enc = created.body["encryptionId"].as_str().unwrap().to_string();
        let sealed = api
            .call(
                Method::POST,
                "/v1/encrypt",
                &json!({"encryptionId": enc, "data": "secret-value", "context": "users/42"}),
            )
            .await;
        assert_eq!(sealed.status, StatusCode::OK, "{}", sealed.body);
        let decrypt = |context: &str, cipher_text: &Value| {
            json!({"encryptionId": enc, "cipherText": cipher_text,
                "encryptionVersionId": sealed.body["encryptionVersionId"],
                "metadata": sealed.body["metadata"], "context": context})
        };
        let tenant = (api.key.as_str(), api.secret.as_str());
        let operator = (api.operator.0.as_str(), api.operator.1.as_str());
        let json_type = "application/json";
        let big = "x".repeat(SETTINGS.max_body_bytes + 1);
        #[rustfmt::skip]
        // Path, credentials, content type, X-Master-Key, body.
        type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, &'a str, Option<&'a str>, String);
        let cases: Vec<Case> = vec![
            (
                "/v1/encrypt",
                Some(tenant),
                json_type,
                None,
                json!({"encryptionId": enc, "data": "x"}).to_string(),
            ),
            (
                "/v1/encrypt?x=1",
                Some(tenant),
                "application/merge+JSON; charset=utf-8",
                None,
                json!({"encryptionId": enc, "data": "x", "context": "c"}).to_string(),
            ),
            (
                "/v1/encrypt",
                None,
                json_type,
                None,
                json!({"encryptionId": enc, "data": "x"}).to_string(),
            ),
            (
                "/v1/encrypt",
                Some((tenant.0, "wrong")),
                json_type,
                None,
                json!({"encryptionId": enc, "data": "x"}).to_string(),
            ),
            (
                "/v1/encrypt",
                Some(operator),
                json_type,
                None,
                json!({"encryptionId": enc, "data": "x"}).to_string(),
            ),
            ("/v1/encrypt", Some(tenant), "text/plain", None, "{}".into()),
            ("/v1/encrypt", Some(tenant), json_type, None, "{".into()),
            ("/v1/encrypt", Some(tenant), json_type, None, "".into()),
            (
                "/v1/encrypt",
                Some(tenant),
                json_type,
                None,
                json!({"encryptionId": enc, "data": big}).to_string(),
            ),
            (
                "/v1/encrypt",
                Some(tenant),
                json_type,
                None,
                json!({"encryptionId": uuid::Uuid::new_v4(), "data": "x"}).to_string(),
            ),
            (
                "/v1/encrypt",
                Some(tenant),
                json_type,
                Some("not base64"),
                json!({"encryptionId": enc, "data": "x"}).to_string(),
            ),
            (
                "/v1/encrypt",
                Some(tenant),
                json_type,
                Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
                json!({"encryptionId": enc, "data": "x"}).to_string(),
            ),
            (
                "/v1/encrypt",
                Some(tenant),
                json_type,
                None,
                json!({"encryptionId": enc, "data": "x", "indexes": ["none"]}).to_string(),
            ),
            (
                "/v1/decrypt",
                Some(tenant),
                json_type,
                None,
                decrypt("users/42", &sealed.body["cipherText"]).to_string(),
            ),
            (
                "/v1/decrypt",
                Some(tenant),
                json_type,
                None,
                decrypt("users/43", &sealed.body["cipherText"]).to_string(),
            ),
            (
                "/v1/decrypt",
                Some(tenant),
                json_type,
                None,
                decrypt("users/42", &json!("AAAA")).to_string(),
            ),
            (
                "/v1/decrypt",
                Some(tenant),
                json_type,
                None,
                decrypt("users/42", &json!("not base64!")).to_string(),
            ),
            ("/v1/decrypt", None, json_type, None, "{}".into()),
        ];
        let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
        let mut answers = Vec::new();
        for (n, (uri, credentials, content_type, master_key, body)) in cases.iter().enumerate() {
            let request_id = format!("same-answer-{n}");
            for edge in [&api.edge, &routed] {
                let mut req = Request::builder()
                    .method(Method::POST)
                    .uri(*uri)
                    .header(header::CONTENT_TYPE, *content_type)
                    .header("x-request-id", &request_id);
                if let Some((key, secret)) = credentials {
                    req = req
                        .header("x-api-key", *key)
                        .header("x-api-secret", *secret);
                }
                if let Some(master_key) = master_key {
                    req = req.header("x-master-key", *master_key);
                }
                let req = req.body(Body::from(body.clone())).unwrap();
                let response = edge.clone().handle(req, peer, None).await;
                let mut headers = response.headers().clone();
                assert_eq!(headers.remove("x-request-id").unwrap(), request_id.as_str());
                let status = response.status();
                if status == StatusCode::OK {
                    // The answer's headers are made in the request's emptied
                    // map: nothing of the request's (its credentials, its
                    // master key) is left in it.
                    let names: Vec<&str> = response.headers().keys().map(|k| k.as_str()).collect();
                    assert_eq!(
                        names,
                        ["content-type", "content-length", "x-request-id"],
                        "{uri}"
                    );
                    // Slices of the body's buffer (plaintext, for a decrypt):
                    // sensitive, so that HTTP/2's header table never keeps
                    // them, and the buffer with them.
                    for name in ["content-length", "x-request-id"] {
                        assert!(response.headers()[name].is_sensitive(), "{uri} {name}");
                    }
                }
                let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .unwrap();
                let mut body: Value = serde_json::from_slice(&bytes).unwrap();
                if status == StatusCode::OK && uri.starts_with("/v1/encrypt") {
                    // Fresh nonces: the rest must be the same.
                    assert!(body["cipherText"].take().is_string(), "{body}");
                    assert!(body["metadata"]["nonce"].take().is_string(), "{body}");
                }
                answers.push((status, headers, body));
            }
            let (routed, hot) = (answers.pop().unwrap(), answers.pop().unwrap());
            assert_eq!(hot.0, routed.0, "{uri} {body:.80}: {}", routed.2);
            assert_eq!(hot.1, routed.1, "{uri} {body:.80}");
            assert_eq!(hot.2, routed.2, "{uri} {body:.80}");
        }
        let records = audit_records(&api).await;
        let records: Vec<Value> = records[records.len() - 2 * cases.len()..]
            .iter()
            .map(|record| {
                let mut record = record.clone();
                for volatile in ["seq", "time", "requestId", "prev", "hash"] {
                    record.as_object_mut().unwrap().remove(volatile);
                }
                record
            })
            .collect();
        for (pair, (uri, ..)) in records.chunks(2).zip(&cases) {
            assert_eq!(pair[0], pair[1], "{uri}");
        }
        assert!(records.iter().any(|r| r["status"] == 200));
    }

    #[tokio::test]
    async fn every_route_that_takes_a_body_refuses_one_that_is_not_json() {
        let api = TestApi::start().await;
        let document: Value = serde_json::from_str(&super::openapi::document()).unwrap();
        let mut checked = 0;
        for route in ROUTES {
            let operation = &document["paths"][route.path][route.method.as_str().to_lowercase()];
            if operation["requestBody"].is_null() {
                continue;
            }
            assert!(route.scope.is_some(), "{}", route.path);
            let req = api
                .authed_for(route, &concrete(route.path))
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from("{}"))
                .unwrap();
            api.send(req).await.is_error(415, "unsupported_media_type");
            checked += 1;
        }
        assert!(checked >= 10, "{checked}");
    }
}
