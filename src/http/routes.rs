//! Every route, declared once, as data (as MinIO KES declares its API): the
//! method, the path, the scope its caller needs (or none), its body limit and
//! the operation its audit record names (or none). The router is built from
//! [`ROUTES`]; each route's layer ([`super::edge::route`]) is given its entry,
//! so the audit record and the request metrics take the operation and the
//! route from it, with no lookup per request. Tests check the table against
//! the OpenAPI document, the audit log's operation names and the real router.
//!
//! The scope in the table cannot differ from the one the handler enforces:
//! [`route!`] names the scope marker once, for the table and for
//! [`TakesAuth`], which only compiles when the handler's second argument is
//! `Auth` of that marker. A route without a scope is checked by a test: it
//! answers without credentials.

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;

use super::extract::{
    AdminScope, AuditReadScope, Auth, DataKeyScope, DecryptScope, EncryptScope, ExportScope,
    ImportScope, IndexScope, ManageScope, OperatorScope, RequiredScope, Requirement, RotateScope,
    UnwrapScope,
};
use super::state::{AppState, RouterSettings};
use super::{
    accounts, admin, audit, batch, contract, datakeys, edge, encryptions, jobs, keys, metrics, ops,
    search, stream,
};

/// One route.
pub(crate) struct Route {
    /// Its method (a GET route also answers HEAD, as the same operation).
    pub method: Method,
    /// Its path, as the OpenAPI document writes it.
    pub path: &'static str,
    /// Which key and scope its caller needs; `None`: no credentials at all.
    pub scope: Option<Requirement>,
    /// How large a body it takes.
    pub body: BodySize,
    /// What its audit record calls it; `None`: not audited.
    pub operation: Option<&'static str>,
    /// Whether the separate operations listener serves it too.
    pub on_ops_listener: bool,
    /// Its handler, as a method router for `method`.
    handler: fn() -> MethodRouter<AppState>,
}

/// The body limit of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodySize {
    /// `max_body_bytes`.
    Normal,
    /// Carries a ciphertext of data up to `max_body_bytes`: see
    /// [`ciphertext_body_limit`].
    Ciphertext,
    /// A batch: `batch.max_body_bytes`.
    Batch,
    /// A raw body streamed through in constant memory: no body limit, no
    /// share of `max_concurrent_body_bytes` and no time limit on the body
    /// (the time limit covers the answer's start only); instead one of
    /// `stream_max_concurrent` slots, a read timeout per body frame
    /// (`stream_read_timeout`), and an audit record written when the
    /// streamed response ends (see [`edge::route`]).
    Stream,
}

/// The body limit of calls that carry a ciphertext (decrypt, rewrap): 16/9 of
/// `max_body_bytes`, plus room for ids and metadata, so that anything encrypt
/// accepted comes back. An AES-256-GCM ciphertext is base64, 4/3 the size of
/// the data; an RSA-OAEP-256 one for long data is base64 of a compact JWE,
/// itself base64url of the data: 4/3 of 4/3.
pub fn ciphertext_body_limit(max_body_bytes: usize) -> usize {
    max_body_bytes
        .saturating_add(max_body_bytes / 9 * 7)
        .saturating_add(64 * 1024)
}

/// A [`Route`] entry. An authenticated route names its scope marker, body size
/// and audited operation; a public one takes no credentials and is not audited.
macro_rules! route {
    ($method:ident $path:literal, $handler:path,
        scope: $scope:ident, body: $body:ident, audit: $operation:literal) => {
        Route {
            method: Method::$method,
            path: $path,
            scope: Some(<$scope as RequiredScope>::REQUIRES),
            body: BodySize::$body,
            operation: Some($operation),
            on_ops_listener: false,
            handler: || on(MethodFilter::$method, scoped::<$scope, _, _>($handler)),
        }
    };
    ($method:ident $path:literal, $handler:path, public, ops_listener: $ops:literal) => {
        Route {
            method: Method::$method,
            path: $path,
            scope: None,
            body: BodySize::Normal,
            operation: None,
            on_ops_listener: $ops,
            handler: || on(MethodFilter::$method, $handler),
        }
    };
}

/// The whole API.
#[rustfmt::skip]
pub(crate) static ROUTES: &[Route] = &[
    // The fixed v1 contract.
    route!(POST "/v1/encrypt", contract::encrypt, scope: EncryptScope, body: Normal, audit: "encrypt"),
    route!(POST "/v1/decrypt", contract::decrypt, scope: DecryptScope, body: Ciphertext, audit: "decrypt"),
    route!(POST "/v1/rotate", contract::rotate, scope: RotateScope, body: Normal, audit: "rotate"),
    // Rewrap and batches.
    route!(POST "/v1/rewrap", batch::rewrap, scope: RotateScope, body: Ciphertext, audit: "rewrap"),
    route!(POST "/v1/encrypt/batch", batch::encrypt_batch, scope: EncryptScope, body: Batch, audit: "encrypt"),
    route!(POST "/v1/decrypt/batch", batch::decrypt_batch, scope: DecryptScope, body: Batch, audit: "decrypt"),
    route!(POST "/v1/rewrap/batch", batch::rewrap_batch, scope: RotateScope, body: Batch, audit: "rewrap"),
    // Envelope encryption: data keys.
    route!(POST "/v1/datakey", datakeys::generate, scope: DataKeyScope, body: Normal, audit: "datakey.generate"),
    route!(POST "/v1/datakey/unwrap", datakeys::unwrap, scope: UnwrapScope, body: Normal, audit: "datakey.unwrap"),
    route!(POST "/v1/datakey/rewrap", datakeys::rewrap, scope: RotateScope, body: Normal, audit: "datakey.rewrap"),
    // Envelope encryption: bodies of any size, streamed.
    route!(POST "/v1/encrypt/stream", stream::encrypt, scope: EncryptScope, body: Stream, audit: "encrypt.stream"),
    route!(POST "/v1/decrypt/stream", stream::decrypt, scope: DecryptScope, body: Stream, audit: "decrypt.stream"),
    // Encryptions and their versions.
    route!(GET "/v1/encryptions", encryptions::list, scope: ManageScope, body: Normal, audit: "encryption.list"),
    route!(POST "/v1/encryptions", encryptions::create, scope: ManageScope, body: Normal, audit: "encryption.create"),
    route!(GET "/v1/encryptions/{id}", encryptions::show, scope: ManageScope, body: Normal, audit: "encryption.read"),
    route!(PATCH "/v1/encryptions/{id}", encryptions::update, scope: ManageScope, body: Normal, audit: "encryption.update"),
    route!(PATCH "/v1/encryptions/{id}/versions/{versionId}", encryptions::update_version, scope: ManageScope, body: Normal, audit: "version.update"),
    // Search over encrypted fields: blind indexes.
    route!(POST "/v1/index", search::index, scope: IndexScope, body: Normal, audit: "index.compute"),
    route!(POST "/v1/index/batch", search::index_batch, scope: IndexScope, body: Batch, audit: "index.compute"),
    route!(GET "/v1/encryptions/{id}/indexes", search::list_indexes, scope: ManageScope, body: Normal, audit: "index.list"),
    route!(POST "/v1/encryptions/{id}/indexes", search::create_index, scope: ManageScope, body: Normal, audit: "index.create"),
    route!(PATCH "/v1/encryptions/{id}/indexes/{name}", search::update_index, scope: ManageScope, body: Normal, audit: "index.update"),
    route!(POST "/v1/encryptions/{id}/indexes/{name}/rotate", search::rotate_index, scope: RotateScope, body: Normal, audit: "index.rotate"),
    // Asymmetric keys, key import (bring your own key) and controlled export.
    route!(GET "/v1/encryptions/{id}/versions/{versionId}/public-key", keys::public_key, scope: EncryptScope, body: Normal, audit: "version.public_key"),
    route!(GET "/v1/import/wrapping-key", keys::wrapping_key, scope: ImportScope, body: Normal, audit: "import.wrapping_key"),
    route!(POST "/v1/encryptions/{id}/import", keys::import, scope: ImportScope, body: Normal, audit: "version.import"),
    route!(POST "/v1/encryptions/{id}/versions/{versionId}/export", keys::export, scope: ExportScope, body: Normal, audit: "version.export"),
    // Re-encryption jobs.
    route!(GET "/v1/jobs", jobs::list, scope: ManageScope, body: Normal, audit: "job.list"),
    route!(POST "/v1/jobs", jobs::create, scope: ManageScope, body: Normal, audit: "job.create"),
    route!(GET "/v1/jobs/{id}", jobs::show, scope: ManageScope, body: Normal, audit: "job.read"),
    route!(POST "/v1/jobs/{id}/cancel", jobs::cancel, scope: ManageScope, body: Normal, audit: "job.cancel"),
    // A tenant's own API keys (its `admin`).
    route!(GET "/v1/api-keys", accounts::list_own_keys, scope: AdminScope, body: Normal, audit: "api_key.list"),
    route!(POST "/v1/api-keys", accounts::create_own_key, scope: AdminScope, body: Normal, audit: "api_key.create"),
    route!(POST "/v1/api-keys/{keyId}/revoke", accounts::revoke_own_key, scope: AdminScope, body: Normal, audit: "api_key.revoke"),
    // The operator's: tenants and their keys, the root KEK.
    route!(GET "/v1/tenants", accounts::list_tenants, scope: OperatorScope, body: Normal, audit: "tenant.list"),
    route!(POST "/v1/tenants", accounts::create_tenant, scope: OperatorScope, body: Normal, audit: "tenant.create"),
    route!(POST "/v1/tenants/{tenantId}/disable", accounts::disable_tenant, scope: OperatorScope, body: Normal, audit: "tenant.disable"),
    route!(GET "/v1/tenants/{tenantId}/api-keys", accounts::list_tenant_keys, scope: OperatorScope, body: Normal, audit: "api_key.list"),
    route!(POST "/v1/tenants/{tenantId}/api-keys", accounts::create_tenant_key, scope: OperatorScope, body: Normal, audit: "api_key.create"),
    route!(POST "/v1/tenants/{tenantId}/api-keys/{keyId}/revoke", accounts::revoke_tenant_key, scope: OperatorScope, body: Normal, audit: "api_key.revoke"),
    route!(GET "/v1/admin/root-kek", admin::status, scope: OperatorScope, body: Normal, audit: "root_kek.read"),
    route!(POST "/v1/admin/root-kek/rotate", admin::rotate, scope: OperatorScope, body: Normal, audit: "root_kek.rotate"),
    route!(GET "/v1/admin/client-certificates", admin::client_certificates, scope: OperatorScope, body: Normal, audit: "client_cert.list"),
    // The audit log: a tenant's own records, or every tenant's for an operator.
    route!(GET "/v1/audit", audit::list, scope: AuditReadScope, body: Normal, audit: "audit.read"),
    // Operations, without credentials.
    route!(GET "/healthz", ops::healthz, public, ops_listener: true),
    route!(GET "/readyz", ops::readyz, public, ops_listener: true),
    route!(GET "/metrics", metrics::metrics, public, ops_listener: true),
    route!(GET "/openapi.json", ops::openapi_json, public, ops_listener: false),
];

/// A handler whose first argument is the state and whose second is `Auth<S>`;
/// `Rest` are its other arguments.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not take `Auth<{S}>` as its second argument",
    note = "a route's scope in the table must be the one its handler's `Auth` enforces"
)]
pub(crate) trait TakesAuth<S, Rest> {}

macro_rules! takes_auth {
    ($($rest:ident),*) => {
        impl<F, Fut, S: RequiredScope, $($rest,)*> TakesAuth<S, ($($rest,)*)> for F
        where
            F: FnOnce(State<AppState>, Auth<S>, $($rest,)*) -> Fut,
        {
        }
    };
}
takes_auth!();
takes_auth!(A);
takes_auth!(A, B);
takes_auth!(A, B, C);
takes_auth!(A, B, C, D);

/// `handler`, once the compiler has checked that it enforces scope `S`.
fn scoped<S, Rest, H: TakesAuth<S, Rest>>(handler: H) -> H {
    handler
}

/// The routes for which `include` holds, each with its own layer: the time
/// limit, its body limit, the audit record and the request metrics (see
/// [`edge::route`]). Without `settings` (the operations listener), no route
/// gets a body limit of its own; with them, `bodies` is the memory the
/// routes' batch and large requests share.
pub(super) fn build(
    state: &AppState,
    settings: Option<(&RouterSettings, &edge::BodyBudget)>,
    timeout: std::time::Duration,
    include: impl Fn(&Route) -> bool,
) -> Router<AppState> {
    let streams = settings.map(|(s, memory)| {
        edge::StreamGate::new(
            s.stream.max_concurrent,
            s.stream.read_timeout,
            memory.clone(),
        )
    });
    ROUTES
        .iter()
        .enumerate()
        .filter(|(_, route)| include(route))
        .fold(Router::new(), |router, (index, route)| {
            let context = context(state, settings, streams.as_ref(), timeout, index, route);
            let handler = (route.handler)()
                .route_layer(axum::middleware::from_fn_with_state(context, edge::route));
            router.route(route.path, handler)
        })
}

/// What [`edge::route`] is given for `route`, entry `index` of the table.
fn context(
    state: &AppState,
    settings: Option<(&RouterSettings, &edge::BodyBudget)>,
    streams: Option<&edge::StreamGate>,
    timeout: std::time::Duration,
    index: usize,
    route: &Route,
) -> edge::RouteContext {
    edge::RouteContext {
        state: state.clone(),
        timeout,
        path: route.path,
        operation: route.operation,
        index,
        body_limit: settings.and_then(|(s, _)| match route.body {
            BodySize::Normal => None,
            BodySize::Ciphertext => Some(ciphertext_body_limit(s.max_body_bytes)),
            BodySize::Batch => Some(s.batch.max_body_bytes),
            // No limit: a stream holds four chunks whatever the body's size
            // (replacing the listener's limit, which the edge set).
            BodySize::Stream => Some(usize::MAX),
        }),
        batch: settings
            .filter(|_| route.body == BodySize::Batch)
            .map(|(s, _)| s.batch),
        // A stream takes its memory through its gate, not a body claim.
        bodies: settings
            .filter(|_| route.body != BodySize::Stream)
            .map(|(_, bodies)| bodies.clone()),
        stream: streams.filter(|_| route.body == BodySize::Stream).cloned(),
    }
}

/// The handlers of the routes the edge answers without the router (see
/// [`edge::HotRoute`]).
#[derive(Clone, Copy)]
pub enum Hot {
    /// `POST /v1/encrypt`.
    Encrypt,
    /// `POST /v1/decrypt`.
    Decrypt,
}

impl edge::HotHandler for Hot {
    async fn call(&self, req: Request, state: AppState) -> Response {
        match self {
            Hot::Encrypt => {
                call_handler(scoped::<EncryptScope, _, _>(contract::encrypt), req, state).await
            }
            Hot::Decrypt => {
                call_handler(scoped::<DecryptScope, _, _>(contract::decrypt), req, state).await
            }
        }
    }
}

/// `handler` called exactly as axum's `Handler` calls a function of five
/// arguments (each of the first four taken from the request's parts, in
/// order, the last from the request; the first rejection is the answer),
/// but as a future of its caller's rather than a boxed one.
async fn call_handler<H, Fut, R, T1, T2, T3, T4, T5>(
    handler: H,
    req: Request,
    state: AppState,
) -> Response
where
    H: FnOnce(T1, T2, T3, T4, T5) -> Fut,
    Fut: std::future::Future<Output = R>,
    R: IntoResponse,
    T1: FromRequestParts<AppState>,
    T2: FromRequestParts<AppState>,
    T3: FromRequestParts<AppState>,
    T4: FromRequestParts<AppState>,
    T5: FromRequest<AppState>,
{
    let (mut parts, body) = req.into_parts();
    macro_rules! extract {
        ($ty:ident) => {
            match $ty::from_request_parts(&mut parts, &state).await {
                Ok(value) => value,
                Err(rejection) => return rejection.into_response(),
            }
        };
    }
    let (t1, t2, t3, t4) = (extract!(T1), extract!(T2), extract!(T3), extract!(T4));
    let req = Request::from_parts(parts, body);
    let t5 = match T5::from_request(req, &state).await {
        Ok(value) => value,
        Err(rejection) => return rejection.into_response(),
    };
    handler(t1, t2, t3, t4, t5).await.into_response()
}

/// The routes the edge answers without the router (see [`edge::HotRoute`]):
/// the two that carry most of the traffic, each with its entry of the table
/// and the same handler (a test in `http` compares their answers with the
/// router's).
pub(super) fn hot(
    state: &AppState,
    settings: &RouterSettings,
    bodies: &edge::BodyBudget,
) -> Vec<edge::HotRoute<Hot>> {
    let handlers = [("/v1/encrypt", Hot::Encrypt), ("/v1/decrypt", Hot::Decrypt)];
    handlers
        .into_iter()
        .filter_map(|(path, handler)| {
            let (index, route) = ROUTES
                .iter()
                .enumerate()
                .find(|(_, r)| r.method == Method::POST && r.path == path)?;
            let timeout = settings.request_timeout;
            Some(edge::HotRoute {
                method: Method::POST,
                path: route.path,
                context: context(state, Some((settings, bodies)), None, timeout, index, route),
                handler,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_audit_log_knows_exactly_the_operations_of_the_table_and_automatic_rotation() {
        let mut operations: BTreeSet<&str> = ROUTES.iter().filter_map(|r| r.operation).collect();
        operations.insert("rotate.automatic");
        // Operator commands at the command line (`keyward client-cert`).
        operations.insert("client_cert.issue");
        operations.insert("client_cert.revoke");
        let known: BTreeSet<&str> = crate::audit::OPERATIONS.iter().copied().collect();
        assert_eq!(operations, known);
        assert_eq!(
            known.len(),
            crate::audit::OPERATIONS.len(),
            "OPERATIONS names an operation twice"
        );
    }

    #[test]
    fn a_route_is_audited_exactly_when_it_takes_credentials() {
        for route in ROUTES {
            assert_eq!(
                route.scope.is_some(),
                route.operation.is_some(),
                "{} {}",
                route.method,
                route.path
            );
            assert_eq!(
                route.scope.is_some(),
                route.path.starts_with("/v1/"),
                "{} {}: every /v1 route, and only those, takes credentials",
                route.method,
                route.path
            );
        }
    }

    #[test]
    fn no_route_is_declared_twice() {
        let mut seen = BTreeSet::new();
        for route in ROUTES {
            assert!(
                seen.insert((route.method.as_str(), route.path)),
                "{} {} is declared twice",
                route.method,
                route.path
            );
        }
    }
}
