//! What every request passes through, written out by hand rather than stacked
//! as tower layers: each layer is a boxed service cloned and a boxed future
//! allocated per request, and nine of them cost more CPU than the encryption.
//!
//! - [`Edge`], outside the router: the request id (the client's `X-Request-Id`
//!   or a new UUID, echoed on the response), the peer address, the client's
//!   address (the peer's, or behind a trusted proxy the forwarded one), the
//!   client certificate, the body limit, the `request` tracing span, panic catching,
//!   and JSON error bodies for every error (a rejection some extractor wrote as
//!   text included).
//! - [`route`], around each matched route, given the route's entry of the
//!   table: its body limit, the time limit, panic catching (so that both are
//!   answered inside the audit record and the metrics, with their own status),
//!   the audit record and the request metrics.
//! - [`HotRoute`]s: `POST /v1/encrypt` and `POST /v1/decrypt`, most of the
//!   traffic, are matched here and answered without the router: the same
//!   [`route`] layer around the same handler (its extractors, so the same
//!   credentials, scopes, rate limits, body checks and audit note), without
//!   the router's, method router's and middleware's boxed services and
//!   futures (about ten allocations per request). What the router adds to a
//!   response (its `Content-Length`) is added here too.
//!
//! What the edge learns about a request (its client address and id), its
//! body limit and its audit note are not request extensions (the first costs
//! three allocations) but one [`RequestFacts`] in a task-local scope around
//! the request's future, where the extractors and the route layer read it.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::FutureExt;
use tower::ServiceExt;
use tracing::Instrument;

use super::audit_note::{self, RequestFacts};
use super::error::{ApiError, ErrorCode};
use super::metrics;
use super::state::{AppState, BatchLimits};
use crate::audit::RequestId;
use crate::domain::client_addr::ForwardedHeader;
use crate::domain::guard::AuthGuard;
use crate::domain::identity::ClientIdentity;

/// The request id header, taken from the client when it sends one.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The proxies' forwarding header (believed only from trusted proxies).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// A router and what every request needs before it reaches a route, and the
/// routes answered without it, whose handlers `H` calls.
#[derive(Clone)]
pub struct Edge<H> {
    router: Router,
    /// Routes answered without the router (none on the operations listener).
    hot: Arc<[HotRoute<H>]>,
    body_limit: Option<usize>,
    /// Finds the client's address (the proxies it believes).
    guard: Arc<AuthGuard>,
}

impl<H: HotHandler> Edge<H> {
    pub(super) fn new(
        router: Router,
        hot: Vec<HotRoute<H>>,
        body_limit: Option<usize>,
        guard: Arc<AuthGuard>,
    ) -> Edge<H> {
        Edge {
            router,
            hot: hot.into(),
            body_limit,
            guard,
        }
    }

    /// Answers one request that came from `peer`, on mutual TLS with `client`'s
    /// certificate.
    pub async fn handle<B>(
        self,
        req: http::Request<B>,
        peer: SocketAddr,
        client: Option<Arc<ClientIdentity>>,
    ) -> Response
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let started = Instant::now();
        let mut req = req.map(Body::new);
        // The client's id is echoed as it came; a new one is made from the
        // text the audit record keeps.
        let (request_id, echoed) = match req.headers().get(&REQUEST_ID) {
            Some(id) if acceptable_request_id(id) => (
                RequestId::from(id.to_str().unwrap_or("-")),
                Some(id.clone()),
            ),
            _ => (new_request_id(), None),
        };
        // The client's address: the peer's, or behind a trusted proxy the
        // forwarded one.
        let proxies = self.guard.trusted_proxies();
        let client_addr = if proxies.is_empty() {
            peer.ip()
        } else {
            let name = match proxies.header() {
                ForwardedHeader::XForwardedFor => X_FORWARDED_FOR,
                ForwardedHeader::Forwarded => header::FORWARDED,
            };
            let values = req.headers().get_all(name);
            proxies.client_addr(peer.ip(), values.iter().map(|v| v.as_bytes()))
        };
        let facts = RequestFacts::new(client_addr, request_id, self.body_limit);
        // Only the method, path, request id and client identity: never headers
        // (they carry secrets) or bodies (they carry plaintext). Who called is
        // in the request's audit record, found by its request id.
        let span = tracing::info_span!(
            "request",
            method = req.method().as_str(),
            path = req.uri().path(),
            request_id = request_id.as_str(),
            client_subject = client.as_ref().map(|c| c.subject.as_str()),
            client_spki = client.as_ref().map(|c| c.spki_hex()),
        );
        if let Some(client) = client {
            req.extensions_mut().insert(client);
        }
        let (router, hot_routes) = (self.router, self.hot);
        let hot = hot_routes
            .iter()
            .position(|r| r.method == req.method() && r.path == req.uri().path());
        let response = async move {
            let answered = async {
                match hot.and_then(|i| hot_routes.get(i)) {
                    Some(hot) => hot.answer(req).await,
                    None => match router.oneshot(req).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    },
                }
            };
            let response = match AssertUnwindSafe(answered).catch_unwind().await {
                Ok(response) => response,
                Err(_panic) => ApiError::Panic.into_response(),
            };
            let response = json_errors(response);
            tracing::debug!(
                latency = format_args!("{} μs", started.elapsed().as_micros()),
                status = response.status().as_u16(),
                "finished processing request"
            );
            response
        }
        .instrument(span);
        let mut response = facts.scope(response).await;
        // Encrypt's and decrypt's answers carry it already (written in their
        // body's buffer, to save an allocation).
        if !response.headers().contains_key(&REQUEST_ID) {
            let echoed = echoed.or_else(|| HeaderValue::from_str(request_id.as_str()).ok());
            if let Some(id) = echoed {
                response.headers_mut().insert(REQUEST_ID, id);
            }
        }
        response
    }
}

/// The longest `X-Request-Id` taken from a client.
const MAX_REQUEST_ID: usize = 128;

/// Whether a client's `X-Request-Id` is kept: 1 to [`MAX_REQUEST_ID`] bytes of
/// visible ASCII. Anything else is replaced by a new id rather than copied into
/// every log line and audit record of the request (hyper alone would let one
/// header run to hundreds of kilobytes, unauthenticated).
fn acceptable_request_id(id: &HeaderValue) -> bool {
    let id = id.as_bytes();
    !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.iter().all(|b| b.is_ascii_graphic())
}

/// A new request id: a random UUID.
fn new_request_id() -> RequestId {
    let mut buf = [0u8; 36];
    RequestId::from(&*uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf))
}

/// What [`route`] needs: what one route's entry of the table says, with the
/// settings, fixed when the router is built.
#[derive(Clone)]
pub(super) struct RouteContext {
    pub(super) state: AppState,
    pub(super) timeout: Duration,
    /// The route's path pattern.
    pub(super) path: &'static str,
    /// The operation its audit record names; `None`: not audited.
    pub(super) operation: Option<&'static str>,
    /// Its position in the route table, for the metrics.
    pub(super) index: usize,
    /// Its own body limit, when it is not the edge's.
    pub(super) body_limit: Option<usize>,
    /// For batch routes, the batch limits (the handlers take them).
    pub(super) batch: Option<BatchLimits>,
    /// The memory batch and large requests share (not on the operations
    /// listener, which takes no bodies, nor on streaming routes, whose
    /// memory their [`StreamGate`] takes).
    pub(super) bodies: Option<BodyBudget>,
    /// For streaming routes ([`super::routes::BodySize::Stream`]), their
    /// slots and read timeout; `None` on every other route.
    pub(super) stream: Option<StreamGate>,
}

/// A body above this size makes a request large: it takes its share of the
/// [`BodyBudget`], as every batch does.
pub(super) const LARGE_BODY: usize = 64 * 1024;

/// The body bytes batch and large requests may hold at once
/// (`max_concurrent_body_bytes`): a request that would go over is refused
/// with 503 `server_busy` and Retry-After once its caller is authenticated,
/// before its body is read, so that concurrent large requests cost bounded
/// memory rather than an out-of-memory kill. Each holds its share (a
/// [`BodyClaim`]) until its response is ready.
#[derive(Clone)]
pub(super) struct BodyBudget {
    permits: Arc<tokio::sync::Semaphore>,
    total: usize,
}

impl BodyBudget {
    /// A budget of `total` bytes (at most `u32::MAX`).
    pub(super) fn new(total: usize) -> BodyBudget {
        let total = total.clamp(1, u32::MAX as usize);
        BodyBudget {
            permits: Arc::new(tokio::sync::Semaphore::new(total)),
            total,
        }
    }

    /// The claim `req` must take before its body is read, if it is a batch
    /// (`always`) or its body is over [`LARGE_BODY`]: its declared length, or
    /// `limit` when it declares none; all of the budget at most (such a
    /// request runs alone).
    fn claim_for(&self, req: &Request, limit: usize, always: bool) -> Option<BodyClaim> {
        let hint = hyper::body::Body::size_hint(req.body());
        let bytes = hint
            .upper()
            .map_or(limit, |n| usize::try_from(n).unwrap_or(usize::MAX))
            .min(limit);
        if !always && bytes <= LARGE_BODY {
            return None;
        }
        Some(BodyClaim {
            budget: self.clone(),
            share: bytes.clamp(1, self.total) as u32,
            held: Arc::new(std::sync::Mutex::new(None)),
        })
    }
}

/// Sets the request's body limit (see [`RequestFacts::body_limit`]).
fn set_body_limit(limit: usize) {
    RequestFacts::change(|facts| facts.body_limit = Some(limit));
}

/// A request's share of the [`BodyBudget`], put in its extensions by
/// [`route`] and taken by the body extractor just before it reads the body:
/// after the caller was authenticated (axum runs the authentication
/// extractor, which reads only headers, before the one extractor that reads
/// the body), so that a caller without credentials never holds any of it,
/// and one with credentials holds it at most for the request's time limit.
/// [`route`] releases it when the response is ready.
#[derive(Clone)]
pub(crate) struct BodyClaim {
    budget: BodyBudget,
    share: u32,
    held: Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>,
}

impl BodyClaim {
    /// Takes the share, or refuses with 503 `server_busy` when the budget
    /// cannot hold it now.
    pub(crate) fn take(&self) -> Result<(), ApiError> {
        let permit = match self
            .budget
            .permits
            .clone()
            .try_acquire_many_owned(self.share)
        {
            Ok(permit) => permit,
            Err(_) => {
                metrics::busy().increment(1);
                return Err(ApiError::Busy);
            }
        };
        if let Ok(mut held) = self.held.lock() {
            *held = Some(permit);
        }
        Ok(())
    }

    /// Gives the share back.
    fn release(&self) {
        if let Ok(mut held) = self.held.lock() {
            held.take();
        }
    }
}

/// The handlers of the routes an edge answers itself, called as the router
/// would call them (their extractors, then them), without the boxed future
/// axum's `Handler` makes per call: the future is part of the request's.
pub trait HotHandler: Clone + Send + Sync + 'static {
    /// Answers `req`.
    fn call(&self, req: Request, state: AppState) -> impl Future<Output = Response> + Send;
}

/// A route the edge answers itself, without the router: its entry of the
/// table, as [`route`] is given it, and its handler.
pub(super) struct HotRoute<H> {
    pub(super) method: Method,
    pub(super) path: &'static str,
    pub(super) context: RouteContext,
    pub(super) handler: H,
}

impl<H: HotHandler> HotRoute<H> {
    /// What the router answers for this route: [`route`] around the
    /// handler, then the response's `Content-Length`.
    async fn answer(&self, req: Request) -> Response {
        let (handler, state) = (&self.handler, self.context.state.clone());
        let mut response =
            around_route(&self.context, req, move |req| handler.call(req, state)).await;
        set_content_length(&mut response);
        response
    }
}

/// What axum's router does to every response it answers (but to a
/// `CONNECT`'s or a `405`'s, which no hot route gives): a body of known
/// length gets a `Content-Length` unless it has one.
fn set_content_length(response: &mut Response) {
    if response.headers().contains_key(header::CONTENT_LENGTH) {
        return;
    }
    let Some(size) = hyper::body::Body::size_hint(response.body()).exact() else {
        return;
    };
    let mut buffer = itoa::Buffer::new();
    if let Ok(value) = HeaderValue::from_str(buffer.format(size)) {
        response.headers_mut().insert(header::CONTENT_LENGTH, value);
    }
}

/// Around every matched route: its body limit, then the time limit and panic
/// catching, inside the audit record and the request metrics, so that a
/// request that times out or panics is recorded with the status it was
/// answered with.
pub(super) async fn route(State(ctx): State<RouteContext>, req: Request, next: Next) -> Response {
    around_route(&ctx, req, |req| next.run(req)).await
}

/// [`route`] for a route whose handler is `run`.
async fn around_route<F, Fut>(ctx: &RouteContext, mut req: Request, run: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let started = Instant::now();
    let method = metrics::method_label(req.method());
    if let Some(limit) = ctx.body_limit {
        set_body_limit(limit);
    }
    if let Some(limits) = ctx.batch {
        req.extensions_mut().insert(limits);
    }
    let streaming = ctx.stream.is_some();
    if let Some(gate) = &ctx.stream {
        req.extensions_mut().insert(gate.clone());
    }
    let (pending, mut req) = match ctx.operation {
        None => (None, req),
        Some(operation) => {
            let (mut parts, body) = req.into_parts();
            let pending =
                audit_note::begin(&ctx.state, &mut parts, operation, ctx.path, streaming).await;
            (Some(pending), Request::from_parts(parts, body))
        }
    };
    let limit = RequestFacts::read(|f| f.body_limit)
        .flatten()
        .unwrap_or(usize::MAX);
    // A declared length over the limit is refused at once, before a byte of
    // the body is read (or waited for).
    let declared = hyper::body::Body::size_hint(req.body()).lower();
    let response = if usize::try_from(declared).map_or(true, |n| n > limit) {
        ApiError::PayloadTooLarge(limit).into_response()
    } else {
        let claim = ctx
            .bodies
            .as_ref()
            .and_then(|bodies| bodies.claim_for(&req, limit, ctx.batch.is_some()));
        if let Some(claim) = &claim {
            req.extensions_mut().insert(claim.clone());
        }
        let answered = AssertUnwindSafe(run(req)).catch_unwind();
        let response = match tokio::time::timeout(ctx.timeout, answered).await {
            Ok(Ok(response)) => response,
            Ok(Err(_panic)) => ApiError::Panic.into_response(),
            Err(_elapsed) => ApiError::Timeout.into_response(),
        };
        if let Some(claim) = claim {
            claim.release();
        }
        response
    };
    let status = response.status().as_u16();
    // A streamed answer is recorded when its body ends, not when it starts.
    let (response, pending) = match (pending, ctx.operation) {
        (Some(pending), Some(operation)) if streaming && response.status().is_success() => {
            (StreamEnd::wrap(response, pending, operation), None)
        }
        (pending, _) => (response, pending),
    };
    if let Some(pending) = pending {
        let error = response.extensions().get::<ErrorCode>().copied();
        pending.answered(status, error).await;
    }
    let route = metrics::Matched::Route {
        index: ctx.index,
        path: ctx.path,
    };
    metrics::record(route, method, status, started);
    response
}

/// What streaming routes share: how many may run at once, and how long a
/// client may send nothing (`stream_max_concurrent`, `stream_read_timeout`).
/// Built once with the router; each streaming request finds it in its
/// extensions (the route layer puts it there).
#[derive(Clone)]
pub(super) struct StreamGate {
    slots: Arc<tokio::sync::Semaphore>,
    read_timeout: Duration,
    /// Where a stream's working memory comes from: the budget batch and
    /// large requests share (`max_concurrent_body_bytes`)...
    memory: BodyBudget,
    /// ...of which all streams together may hold at most half, so that
    /// streams, which may last up to `connection_max_age`, never leave
    /// batches without room.
    streams_memory: Arc<tokio::sync::Semaphore>,
}

impl StreamGate {
    /// A gate for `max_concurrent` streams that cuts off a client silent for
    /// `read_timeout`.
    pub(super) fn new(
        max_concurrent: usize,
        read_timeout: Duration,
        memory: BodyBudget,
    ) -> StreamGate {
        StreamGate {
            slots: Arc::new(tokio::sync::Semaphore::new(
                max_concurrent.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
            read_timeout,
            streams_memory: Arc::new(tokio::sync::Semaphore::new(memory.total / 2)),
            memory,
        }
    }

    /// The most working memory one stream may hold: what all streams
    /// together may (half of `max_concurrent_body_bytes`).
    pub(super) fn max_stream_memory(&self) -> usize {
        self.memory.total / 2
    }

    /// The working memory of one stream, `bytes` (at most
    /// [`StreamGate::max_stream_memory`]), taken from the streams' half and
    /// from the budget batch and large requests share, and held until the
    /// stream ends; 503 `server_busy` when either cannot hold it now. A
    /// stream's chunk size is its caller's choice, so the count of streams
    /// alone does not bound their memory.
    pub(super) fn hold(&self, bytes: usize) -> Result<StreamMemory, ApiError> {
        let share = bytes.clamp(1, self.max_stream_memory().max(1)) as u32;
        let busy = |_| {
            metrics::busy().increment(1);
            ApiError::Busy
        };
        let streams = self
            .streams_memory
            .clone()
            .try_acquire_many_owned(share)
            .map_err(busy)?;
        let shared = self
            .memory
            .permits
            .clone()
            .try_acquire_many_owned(share)
            .map_err(busy)?;
        Ok(StreamMemory(streams, shared))
    }

    /// A slot for one stream, held until the stream ends; 503
    /// `server_busy` when every slot is taken.
    pub(super) fn enter(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            metrics::busy().increment(1);
            ApiError::Busy
        })
    }

    /// How long a streaming request's client may send nothing.
    pub(super) fn read_timeout(&self) -> Duration {
        self.read_timeout
    }
}

/// A stream's working memory, held until it ends (see [`StreamGate::hold`]).
pub(super) struct StreamMemory(
    #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit,
    #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit,
);

/// Why a stream failed after its response started: the code its audit
/// record names (the client sees only a failed transfer).
#[derive(Debug, thiserror::Error)]
#[error("stream aborted: {code}")]
pub(super) struct StreamAbort {
    /// `decryption_failed`, `stream_truncated`, `stream_timeout` (the
    /// client sent nothing for the read timeout), `stream_not_read` (it read
    /// nothing for as long), `stream_read_failed` or `stream_too_long`.
    pub(super) code: &'static str,
}

/// Marks a response whose body is a stream that outlives the handler: the
/// connection counts its request in flight until the body ends (see
/// `crate::server`), so that its idle timeout does not close it mid-stream.
#[derive(Clone, Copy)]
pub struct Streamed;

/// The body of a streamed answer: records the request's audit record (and
/// the streams counter) when the body ends, with the code of the
/// [`StreamAbort`] that ended it early, if one did; a body
/// dropped before its end (the client went away) is recorded as
/// `cancelled`.
struct StreamEnd {
    inner: Body,
    pending: Option<audit_note::Pending>,
    operation: &'static str,
}

impl StreamEnd {
    fn wrap(response: Response, pending: audit_note::Pending, operation: &'static str) -> Response {
        let mut response = response.map(|inner| {
            Body::new(StreamEnd {
                inner,
                pending: Some(pending),
                operation,
            })
        });
        response.extensions_mut().insert(Streamed);
        response
    }

    fn end(&mut self, error: Option<&'static str>) {
        if let Some(pending) = self.pending.take() {
            metrics::stream_ended(self.operation, error.unwrap_or("ok"));
            pending.answered_later(Some(200), error);
        }
    }
}

/// The code of the [`StreamAbort`] inside `error`.
fn abort_code(error: &axum::Error) -> &'static str {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(abort) = e.downcast_ref::<StreamAbort>() {
            return abort.code;
        }
        cause = e.source();
    }
    "stream_failed"
}

impl hyper::body::Body for StreamEnd {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.end(None),
            std::task::Poll::Ready(Some(Err(e))) => {
                let code = abort_code(e);
                self.end(Some(code));
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            metrics::stream_ended(self.operation, "cancelled");
            pending.answered_later(None, Some("cancelled"));
        }
    }
}

/// The router's fallback: no route has this path.
pub(super) async fn not_found(req: Request) -> ApiError {
    let method = metrics::method_label(req.method());
    metrics::record(metrics::Matched::Unmatched, method, 404, Instant::now());
    ApiError::RouteNotFound
}

/// Gives every error response the JSON error shape, including those an
/// extractor's rejection wrote as text.
fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    ApiError::Rejected(status).into_response()
}
