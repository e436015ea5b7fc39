//! Streaming envelope encryption: `POST /v1/encrypt/stream` seals a raw body
//! of any size into Keyward's stream format (`crate::crypto::stream`, the
//! format `keyward encrypt-file` writes) and `POST /v1/decrypt/stream` opens
//! one, both chunk by chunk in constant memory (docs/envelope.md, "Streaming
//! routes").
//!
//! Encrypt mints the stream's data key exactly as `POST /v1/datakey` does,
//! decrypt unwraps it exactly as `POST /v1/datakey/unwrap` does (through the
//! same service calls), so version states, `minDecryptionVersion`, the
//! nonce-bound accounting and the caller's context apply unchanged. The
//! context travels in the `X-Keyward-Context` header, never in the URL: URLs
//! end up in proxies' and load balancers' access logs.
//!
//! Everything that can fail before the first byte of the response (the
//! caller, the scope, the encryption, the key version, the stream's header,
//! the context) is a JSON error with its stable code. A failure after the
//! response started (a chunk that does not verify, a stream cut short, a
//! client that stalls) ends the body with an error, so hyper closes the
//! connection without the final empty chunk of HTTP/1.1 chunked encoding (an
//! HTTP/2 stream is reset): the client sees a failed transfer, never a clean
//! end. A chunk's plaintext is released only once the chunk verified.
//!
//! Memory: each stream holds the chunk being filled plus at most one body
//! frame from hyper, and one finished piece waiting for hyper to write it,
//! whatever the body's size; at most `stream_max_concurrent` streams run at
//! once, and each takes that memory from `max_concurrent_body_bytes` (the
//! budget batch and large requests share) before its first chunk, all
//! streams together at most half of it, so that callers choosing large
//! chunks cannot add up past it nor leave batches without room; a chunk
//! size whose memory one stream may not hold is refused (400).
//!
//! HTTP/1.1 or HTTP/2 only: over HTTP/1.0 the end of a body of unknown
//! length is the connection's close, which an abort cannot be told from. The work runs in a task of its own, one piece ahead of the response
//! (see [`respond`]), so that a client that stops reading frees its slot
//! after `stream_read_timeout`, as one that stops sending does.
//!
//! Not cleared: a decrypted chunk, once handed to hyper as `Bytes`, is
//! hyper's to write and free (as every JSON answer's plaintext is).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Deserializer};
use utoipa::IntoParams;
use zeroize::Zeroizing;

use super::audit_note::AuditNote;
use super::contract::context_bytes;
use super::edge::{StreamAbort, StreamGate, StreamMemory};
use super::error::{ApiError, ErrorBody};
use super::extract::{parse_id, Auth, DecryptScope, EncryptScope, MasterKeyHeader, MasterKeyParam};
use super::metrics;
use super::query::{self, ApiQuery};
use super::state::AppState;
use crate::crypto::stream::{
    StreamCipher, StreamError, StreamHeader, DEFAULT_CHUNK_SIZE, FIXED_HEADER_LEN, MAX_CHUNK_SIZE,
    MAX_WRAPPED_KEY_LEN, MIN_CHUNK_SIZE,
};
use crate::domain::{EncryptionId, VersionId};

/// The header that carries the caller's context, percent-encoded UTF-8.
pub(crate) const X_KEYWARD_CONTEXT: HeaderName = HeaderName::from_static("x-keyward-context");

/// Room for one body frame beyond a chunk (hyper's HTTP/1.1 read buffer
/// holds at most about 400 KiB; HTTP/2 frames are 16 KiB by default).
const MAX_FRAME: usize = 512 * 1024;

/// The AES-GCM tag each sealed chunk carries.
const TAG_LEN: usize = 16;

/// The query of `POST /v1/encrypt/stream`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct EncryptStreamParams {
    /// The encryption whose active version wraps the stream's data key.
    #[serde(default, deserialize_with = "query::uuid_text")]
    #[param(format = Uuid, required = true)]
    encryption_id: Option<String>,
    /// Plaintext bytes per chunk, 1024 to 16777216 (default 65536), and at
    /// most what one stream may hold: four chunks in half of
    /// `max_concurrent_body_bytes` (1834992 at the defaults; more is 400).
    #[serde(default, deserialize_with = "chunk_size")]
    #[param(minimum = 1024, maximum = 16777216)]
    chunk_size: Option<u32>,
}

/// The query of `POST /v1/decrypt/stream`: none (the stream's header names
/// the encryption, the version and the wrapped key).
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DecryptStreamParams {}

fn chunk_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    const _: () = assert!(MIN_CHUNK_SIZE == 1024 && MAX_CHUNK_SIZE == 16 * 1024 * 1024);
    query::value(
        d,
        |v| {
            v.parse()
                .ok()
                .filter(|n| (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(n))
        },
        "must be an integer from 1024 to 16777216",
    )
}

/// Raw bytes of any length, for the OpenAPI document.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct OctetStream(Vec<u8>);

/// The `X-Keyward-Context` header, for the OpenAPI document.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct ContextParam {
    /// The caller's context, percent-encoded UTF-8 (up to 1024 characters
    /// once decoded), bound into the stream's wrapped data key: decrypting
    /// needs it again, byte for byte. Absent or empty: none. A header, never
    /// a query parameter, so that it stays out of access logs.
    #[param(rename = "X-Keyward-Context", nullable = false)]
    x_keyward_context: Option<String>,
}

/// The context of a streaming request: the `X-Keyward-Context` header,
/// percent-decoded. Present but malformed (repeated, not UTF-8 once decoded,
/// too long) is `invalid_request`, never treated as absent; the message
/// never repeats the value.
fn context_header(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(&X_KEYWARD_CONTEXT).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::InvalidRequest(
            "`X-Keyward-Context`: sent more than once".into(),
        ));
    }
    let decoded: Vec<u8> = percent_encoding::percent_decode(value.as_bytes()).collect();
    let text = String::from_utf8(decoded).map_err(|_| {
        ApiError::InvalidRequest("`X-Keyward-Context`: not percent-encoded UTF-8".into())
    })?;
    let context = Some(text);
    context_bytes(&context).map_err(|_| {
        ApiError::InvalidRequest("`X-Keyward-Context`: at most 1024 characters".into())
    })?;
    Ok(context)
}

/// A streaming request's input: its context, its body, and its slot among
/// the `stream_max_concurrent` streams. The body extractor, so it runs after
/// the caller was authenticated: a caller without credentials never holds a
/// slot.
pub struct StreamInput {
    context: Option<String>,
    body: BodyReader,
    slot: tokio::sync::OwnedSemaphorePermit,
    gate: StreamGate,
}

impl FromRequest<AppState> for StreamInput {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &AppState) -> Result<Self, ApiError> {
        // Over HTTP/1.0 a body of unknown length ends by closing the
        // connection, so an aborted stream would look complete to the client
        // (or to a proxy speaking HTTP/1.0 to Keyward, nginx's default).
        if req.version() < axum::http::Version::HTTP_11 {
            return Err(ApiError::InvalidRequest(
                "the streaming routes need HTTP/1.1 or HTTP/2: over HTTP/1.0 an aborted \
                 stream cannot be told from a complete one"
                    .into(),
            ));
        }
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let mime = ct
                .to_str()
                .ok()
                .and_then(|v| v.split(';').next())
                .map(|m| m.trim().to_ascii_lowercase());
            if mime.as_deref() != Some("application/octet-stream") {
                return Err(ApiError::UnsupportedMediaType);
            }
        }
        let context = context_header(req.headers())?;
        // Outside the route table's streaming layer (never), no stream.
        let gate = req
            .extensions()
            .get::<StreamGate>()
            .cloned()
            .ok_or(ApiError::Busy)?;
        let slot = gate.enter()?;
        Ok(StreamInput {
            context,
            body: BodyReader {
                frames: req.into_body().into_data_stream(),
                read_timeout: gate.read_timeout(),
                ended: false,
            },
            slot,
            gate,
        })
    }
}

/// What one stream of `chunk`-byte chunks holds at most: the chunk being
/// filled and a body frame, the piece waiting for room in the channel, the
/// piece in the channel, the piece hyper is writing, and hyper's write
/// buffer (about a frame).
fn stream_memory(chunk: usize) -> usize {
    4 * (chunk + TAG_LEN) + 2 * MAX_FRAME
}

/// Refuses a chunk size whose working memory is more than one stream may
/// hold (half of `max_concurrent_body_bytes`: about 1.8 MiB chunks at the
/// defaults), before any of it is taken.
fn check_chunk_size(gate: &StreamGate, chunk: usize, what: &str) -> Result<(), ApiError> {
    let max = gate.max_stream_memory();
    if stream_memory(chunk) > max {
        let largest = (max.saturating_sub(2 * MAX_FRAME) / 4).saturating_sub(TAG_LEN);
        return Err(ApiError::InvalidRequest(format!(
            "{what} is over the {largest} bytes per chunk this server streams \
             (a stream may hold four chunks of half of `max_concurrent_body_bytes`); \
             use a smaller chunk size, or `keyward decrypt-file` for a file made with a larger one"
        )));
    }
    Ok(())
}

const TAMPERED: StreamAbort = StreamAbort {
    code: "decryption_failed",
};
const TRUNCATED: StreamAbort = StreamAbort {
    code: "stream_truncated",
};
const STALLED: StreamAbort = StreamAbort {
    code: "stream_timeout",
};
const READ_FAILED: StreamAbort = StreamAbort {
    code: "stream_read_failed",
};
const TOO_LONG: StreamAbort = StreamAbort {
    code: "stream_too_long",
};
const UNREAD: StreamAbort = StreamAbort {
    code: "stream_not_read",
};

/// The request body, frame by frame, each awaited at most `read_timeout`.
struct BodyReader {
    frames: axum::body::BodyDataStream,
    read_timeout: Duration,
    ended: bool,
}

impl BodyReader {
    /// Appends the next frame to `buf`; `false` once the body ended.
    async fn fill(&mut self, buf: &mut Vec<u8>) -> Result<bool, StreamAbort> {
        while !self.ended {
            match tokio::time::timeout(self.read_timeout, self.frames.next()).await {
                Err(_elapsed) => return Err(STALLED),
                Ok(None) => self.ended = true,
                Ok(Some(Err(_))) => return Err(READ_FAILED),
                Ok(Some(Ok(data))) if data.is_empty() => {}
                Ok(Some(Ok(data))) => {
                    buf.extend_from_slice(&data);
                    // Plaintext on encrypt: cleared when it is ours alone.
                    super::secret::clear_if_unique(data);
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

/// One stream's work: sealing or opening.
enum Job {
    Seal(Sealing),
    Open(Opening),
}

impl Job {
    async fn next(&mut self) -> Option<Result<Bytes, StreamAbort>> {
        match self {
            Job::Seal(s) => s.next().await,
            Job::Open(o) => o.next().await,
        }
    }

    fn write_timeout(&self) -> Duration {
        match self {
            Job::Seal(s) => s.input.read_timeout,
            Job::Open(o) => o.input.read_timeout,
        }
    }
}

/// The streamed `application/octet-stream` response of `job`, which runs
/// in a task of its own, one piece ahead of the response. A client that
/// reads no response for the read timeout (and so, with a full socket,
/// would hold the stream's slot forever: nothing polls a body hyper cannot
/// write) ends the task and frees its slot; the connection is then bounded
/// by `connection_max_age`. The body ends cleanly only when the job did:
/// if the task ended any other way, the body ends with an error.
fn respond(mut job: Job) -> Response {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::mpsc::error::SendTimeoutError;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, StreamAbort>>(1);
    let ended = std::sync::Arc::new(AtomicBool::new(false));
    let job_ended = ended.clone();
    tokio::spawn(async move {
        let timeout = job.write_timeout();
        loop {
            let Some(item) = job.next().await else {
                job_ended.store(true, Ordering::Release);
                return;
            };
            let failed = item.is_err();
            match tx.send_timeout(item, timeout).await {
                Ok(()) if !failed => {}
                Ok(()) | Err(SendTimeoutError::Closed(_)) => return,
                Err(SendTimeoutError::Timeout(_)) => {
                    metrics::stream_unread().increment(1);
                    return;
                }
            }
        }
    });
    let pieces = futures_util::stream::unfold(Some(rx), move |rx| {
        let ended = ended.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(item) => Some((item, Some(rx))),
                None if ended.load(Ordering::Acquire) => None,
                None => Some((Err(UNREAD), None)),
            }
        }
    });
    octet_stream(Body::from_stream(pieces))
}

/// A streamed `application/octet-stream` response of `body`.
fn octet_stream(body: Body) -> Response {
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// Encrypt a raw body of any size into Keyward's stream format (the format
/// of `keyward encrypt-file`), chunk by chunk, under a fresh data key
/// wrapped by the encryption's active version. The response is streamed;
/// treat it as valid only if the transfer completed (an aborted transfer
/// lacks its final chunk).
#[utoipa::path(
    post,
    path = "/v1/encrypt/stream",
    operation_id = "encrypt_stream",
    tag = "envelope",
    params(EncryptStreamParams, ContextParam, MasterKeyParam),
    request_body(content = OctetStream, content_type = "application/octet-stream", description = "The plaintext, any size (chunked transfer or a Content-Length)"),
    responses(
        (status = 200, description = "The stream (header, then sealed chunks), streamed as it is made", content_type = "application/octet-stream", body = OctetStream),
        (status = 400, description = "`invalid_request`, `invalid_master_key`, `master_key_not_applicable`", body = ErrorBody),
        (status = 401, description = "`missing_credentials`, `invalid_credentials` or `master_key_required`", body = ErrorBody),
        (status = 403, description = "`insufficient_scope` (needs `encrypt`) or `master_key_mismatch`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
        (status = 503, description = "`server_busy` (`stream_max_concurrent` streams run already, or `max_concurrent_body_bytes` cannot hold its working memory now; retry after Retry-After), `rotation_pending` or `unavailable`", body = ErrorBody),
    )
)]
pub(super) async fn encrypt(
    State(state): State<AppState>,
    auth: Auth<EncryptScope>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiQuery(params): ApiQuery<EncryptStreamParams>,
    input: StreamInput,
) -> Result<Response, ApiError> {
    // Checked here rather than by the query's parser, so that a body of
    // another type is 415 whatever the query.
    let Some(id) = params.encryption_id.as_deref() else {
        return Err(ApiError::InvalidRequest(
            "missing query parameter `encryptionId`".into(),
        ));
    };
    let id: EncryptionId = parse_id(id, "encryptionId")?;
    note.encryption(id);
    let chunk_size = params.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
    check_chunk_size(&input.gate, chunk_size as usize, "`chunkSize`")?;
    let context = context_bytes(&input.context)?;
    let made = state
        .service
        .generate_data_key(auth.tenant, id, context, client_key.0.as_ref())
        .await?;
    note.version(made.version_id);
    let header = StreamHeader::new(
        chunk_size,
        *id.as_bytes(),
        *made.version_id.as_bytes(),
        made.wrapped,
    );
    let header_bytes = header.encode();
    let cipher = StreamCipher::new(&made.key, &header, &header_bytes);
    drop(made.key);
    let chunk = cipher.chunk_size();
    let memory = input.gate.hold(stream_memory(chunk))?;
    let sealing = Sealing {
        cipher,
        header: Some(header_bytes),
        // A chunk and the largest frame hyper hands over (its HTTP/1.1 read
        // buffer is at most about 400 KiB): `plain` never reallocates, so no
        // copy of the plaintext is freed without being cleared.
        plain: Zeroizing::new(Vec::with_capacity(chunk + MAX_FRAME)),
        input: input.body,
        done: false,
        _slot: (input.slot, memory),
    };
    Ok(respond(Job::Seal(sealing)))
}

/// The state of one encrypting stream.
struct Sealing {
    cipher: StreamCipher,
    /// The stream's header, until it is sent.
    header: Option<Vec<u8>>,
    /// Plaintext received and not sealed yet: at most a chunk and a frame.
    plain: Zeroizing<Vec<u8>>,
    input: BodyReader,
    done: bool,
    /// Its slot and its working memory, held until it ends.
    _slot: (tokio::sync::OwnedSemaphorePermit, StreamMemory),
}

impl Sealing {
    /// The next piece of the response: the header, then each sealed chunk.
    /// A chunk is sealed as the last only once the body ended, so a full
    /// chunk waits for one more byte (or the end) before it goes.
    async fn next(&mut self) -> Option<Result<Bytes, StreamAbort>> {
        if self.done {
            return None;
        }
        if let Some(header) = self.header.take() {
            return Some(Ok(Bytes::from(header)));
        }
        let chunk = self.cipher.chunk_size();
        loop {
            let last = if self.plain.len() > chunk {
                false
            } else {
                match self.input.fill(&mut self.plain).await {
                    Ok(true) => continue,
                    Ok(false) => true,
                    Err(abort) => {
                        self.done = true;
                        return Some(Err(abort));
                    }
                }
            };
            let n = self.plain.len().min(chunk);
            let mut sealed = Vec::with_capacity(n + TAG_LEN);
            sealed.extend_from_slice(&self.plain[..n]);
            // Moves the rest (at most one frame) to the front, then clears
            // the tail it leaves behind.
            self.plain.copy_within(n.., 0);
            let rest = self.plain.len() - n;
            zeroize::Zeroize::zeroize(&mut self.plain[rest..]);
            self.plain.truncate(rest);
            if self.cipher.seal_chunk(&mut sealed, last).is_err() {
                // Past 2^32 chunks.
                zeroize::Zeroize::zeroize(&mut sealed);
                self.done = true;
                return Some(Err(TOO_LONG));
            }
            metrics::stream_bytes("encrypt").increment(n as u64);
            self.done = last;
            return Some(Ok(Bytes::from(sealed)));
        }
    }
}

/// Decrypt a stream made by `/v1/encrypt/stream` or `keyward encrypt-file`,
/// chunk by chunk: the stream's header names the encryption, the version and
/// the wrapped data key, which is unwrapped as `/v1/datakey/unwrap` does
/// (context, version states, `minDecryptionVersion`) before the first byte
/// of the response. A chunk's plaintext is sent only once it verified; a
/// damaged, reordered, cut or extended stream aborts the transfer, so treat
/// the output as valid only if the transfer completed.
#[utoipa::path(
    post,
    path = "/v1/decrypt/stream",
    operation_id = "decrypt_stream",
    tag = "envelope",
    params(DecryptStreamParams, ContextParam, MasterKeyParam),
    request_body(content = OctetStream, content_type = "application/octet-stream", description = "A Keyward stream (version 1), any size"),
    responses(
        (status = 200, description = "The plaintext, streamed chunk by chunk as each verifies", content_type = "application/octet-stream", body = OctetStream),
        (status = 400, description = "`decryption_failed` (wrong or missing context, another encryption's key, a changed header), `invalid_stream` (not a Keyward stream), `invalid_request`, `invalid_master_key`", body = ErrorBody),
        (status = 401, description = "`missing_credentials`, `invalid_credentials` or `master_key_required`", body = ErrorBody),
        (status = 403, description = "`insufficient_scope` (needs `decrypt`), `version_disabled`, `version_below_min_decryption` or `master_key_mismatch`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
        (status = 408, description = "`request_timeout`: the client sent nothing for `stream_read_timeout` before the stream's header was complete", body = ErrorBody),
        (status = 410, description = "`version_destroyed`", body = ErrorBody),
        (status = 503, description = "`server_busy` (`stream_max_concurrent` streams run already, or `max_concurrent_body_bytes` cannot hold its working memory now; retry after Retry-After) or `unavailable`", body = ErrorBody),
    )
)]
pub(super) async fn decrypt(
    State(state): State<AppState>,
    auth: Auth<DecryptScope>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiQuery(_params): ApiQuery<DecryptStreamParams>,
    mut input: StreamInput,
) -> Result<Response, ApiError> {
    let mut buf = Vec::with_capacity(FIXED_HEADER_LEN + MAX_WRAPPED_KEY_LEN);
    let (header, header_bytes) = read_header(&mut input.body, &mut buf).await?;
    let id = EncryptionId(uuid::Uuid::from_bytes(header.encryption_id));
    note.encryption(id);
    check_chunk_size(
        &input.gate,
        header.chunk_size as usize,
        "the stream's chunk size",
    )?;
    if let Some(v) = crate::domain::service::wrapped_key_version(&header.wrapped_key) {
        note.version(v);
    }
    let context = context_bytes(&input.context)?;
    let (key, version): (_, VersionId) = state
        .service
        .unwrap_data_key(
            auth.tenant,
            id,
            &header.wrapped_key,
            context,
            client_key.0.as_ref(),
        )
        .await?;
    // The header's version id is authenticated by every chunk; the wrapped
    // key names the version that unwrapped it. A header naming another one
    // was changed.
    if version.as_bytes() != &header.version_id {
        return Err(ApiError::Key(
            crate::domain::service::KeyError::DecryptionFailed,
        ));
    }
    let cipher = StreamCipher::new(&key, &header, &header_bytes);
    drop(key);
    let memory = input.gate.hold(stream_memory(cipher.chunk_size()))?;
    let sealed = cipher.chunk_size() + TAG_LEN;
    let mut rest = Vec::with_capacity(2 * sealed);
    rest.extend_from_slice(&buf);
    let opening = Opening {
        cipher,
        sealed: rest,
        input: input.body,
        done: false,
        _slot: (input.slot, memory),
    };
    Ok(respond(Job::Open(opening)))
}

/// Reads the stream's header from the body; what follows it stays in `buf`.
/// A body that ends first or is not a Keyward stream is `invalid_stream`; a
/// client silent for the read timeout, `request_timeout`.
async fn read_header(
    body: &mut BodyReader,
    buf: &mut Vec<u8>,
) -> Result<(StreamHeader, Vec<u8>), ApiError> {
    let mut need = FIXED_HEADER_LEN;
    loop {
        if buf.len() >= FIXED_HEADER_LEN && need == FIXED_HEADER_LEN {
            let len = u16::from_be_bytes([buf[61], buf[62]]) as usize;
            need = FIXED_HEADER_LEN + len.clamp(1, MAX_WRAPPED_KEY_LEN);
        }
        if buf.len() >= need {
            let mut reader = &buf[..];
            let parsed = StreamHeader::read_from(&mut reader);
            let used = buf.len() - reader.len();
            let parsed = parsed.map_err(|_| ApiError::InvalidStream)?;
            buf.drain(..used);
            return Ok(parsed);
        }
        match body.fill(buf).await {
            Ok(true) => {}
            Ok(false) => return Err(ApiError::InvalidStream),
            Err(a) if a.code == STALLED.code => return Err(ApiError::StreamTimeout),
            Err(_) => {
                return Err(ApiError::InvalidRequest(
                    "the request body could not be read".into(),
                ))
            }
        }
    }
}

/// The state of one decrypting stream.
struct Opening {
    cipher: StreamCipher,
    /// Sealed bytes received and not opened yet: at most a sealed chunk and
    /// a frame.
    sealed: Vec<u8>,
    input: BodyReader,
    done: bool,
    /// Its slot and its working memory, held until it ends.
    _slot: (tokio::sync::OwnedSemaphorePermit, StreamMemory),
}

impl Opening {
    /// The next verified chunk's plaintext. A chunk is opened as the last
    /// only once the body ended; a full chunk waits for one more byte (or
    /// the end) first.
    async fn next(&mut self) -> Option<Result<Bytes, StreamAbort>> {
        if self.done {
            return None;
        }
        let sealed = self.cipher.chunk_size() + TAG_LEN;
        loop {
            let last = if self.sealed.len() > sealed {
                false
            } else {
                match self.input.fill(&mut self.sealed).await {
                    Ok(true) => continue,
                    Ok(false) => true,
                    Err(abort) => {
                        self.done = true;
                        return Some(Err(abort));
                    }
                }
            };
            self.done = true;
            // The body ended right after a chunk opened as not the last.
            if last && self.sealed.is_empty() {
                return Some(Err(TRUNCATED));
            }
            let n = self.sealed.len().min(sealed);
            let mut chunk = self.sealed[..n].to_vec();
            self.sealed.drain(..n);
            match self.cipher.open_chunk(&mut chunk, last) {
                Ok(()) => {}
                // A full chunk at the end that is not the last: cut at a
                // chunk boundary (or that last chunk was changed).
                Err(StreamError::Tampered) if last && n == sealed => return Some(Err(TRUNCATED)),
                Err(_) => return Some(Err(TAMPERED)),
            }
            metrics::stream_bytes("decrypt").increment(chunk.len() as u64);
            self.done = last;
            return Some(Ok(Bytes::from(chunk)));
        }
    }
}
