//! The benchmark's ceiling: the least a server can do to answer Keyward's
//! encrypt and decrypt, so `bench/run` can tell how much of the time Keyward's
//! own work (authentication, key ring, AES-GCM, audit, metrics) takes.
//!
//! Same runtime and HTTP stack as `keyward serve`: a default multi-thread tokio
//! runtime (one worker per core), an accept loop that sets `TCP_NODELAY` and
//! serves each connection with hyper-util's HTTP/1.1 + HTTP/2 builder, and an
//! axum router. `POST /v1/encrypt` parses Keyward's encrypt body and answers a
//! body of the same shape and size (the "ciphertext" is the data plus 16 zero
//! bytes, base64); `POST /v1/decrypt` parses Keyward's decrypt body, decodes the
//! base64 and answers `{"data": ...}`. No authentication, no cryptography.
//!
//! ```text
//! cargo run --release --example ceiling -- [ADDR]     # default 127.0.0.1:0
//! ```
//!
//! Prints `{"message":"listening","addr":"IP:PORT"}` on stderr once it accepts
//! connections, like `keyward serve`'s log line. Stops on SIGTERM or Ctrl-C.

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// The same allocator, with the same settings, as `keyward`.
#[path = "../src/allocator.rs"]
mod allocator;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// The size of an AES-GCM tag: what Keyward's ciphertext adds to the data.
const TAG_LEN: usize = 16;
/// A fixed version id, the length of a real one.
const VERSION_ID: &str = "00000000-0000-4000-8000-000000000000";
/// Base64 of 12 zero bytes: a nonce's length.
const NONCE: &str = "AAAAAAAAAAAAAAAA";

/// Keyward's encrypt input.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EncryptRequest {
    encryption_id: String,
    data: String,
    #[serde(default)]
    encryption_version_id: Option<String>,
}

/// Keyward's encrypt output.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EncryptResponse {
    cipher_text: String,
    encryption_id: String,
    encryption_version_id: String,
    algorithm: &'static str,
    metadata: Metadata,
}

/// Keyward's metadata: the nonce.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    nonce: String,
}

/// Keyward's decrypt input: every field is parsed as Keyward does; only the
/// ciphertext is used.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct DecryptRequest {
    encryption_id: String,
    cipher_text: String,
    encryption_version_id: String,
    metadata: serde_json::Map<String, serde_json::Value>,
}

/// Keyward's decrypt output.
#[derive(Serialize)]
struct DecryptResponse {
    data: String,
}

async fn encrypt(Json(req): Json<EncryptRequest>) -> Json<EncryptResponse> {
    let mut sealed = Vec::with_capacity(req.data.len() + TAG_LEN);
    sealed.extend_from_slice(req.data.as_bytes());
    sealed.extend_from_slice(&[0; TAG_LEN]);
    Json(EncryptResponse {
        cipher_text: B64.encode(sealed),
        encryption_id: req.encryption_id,
        encryption_version_id: req
            .encryption_version_id
            .unwrap_or_else(|| VERSION_ID.to_string()),
        algorithm: "AES-256-GCM",
        metadata: Metadata {
            nonce: NONCE.to_string(),
        },
    })
}

async fn decrypt(Json(req): Json<DecryptRequest>) -> Result<Json<DecryptResponse>, StatusCode> {
    let mut bytes = B64
        .decode(req.cipher_text.as_bytes())
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    bytes.truncate(bytes.len().saturating_sub(TAG_LEN));
    let data = String::from_utf8(bytes).map_err(|_| StatusCode::BAD_REQUEST)?;
    Ok(Json(DecryptResponse { data }))
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    // The same runtime as `keyward` (src/main.rs): defaults, one worker per core.
    #[cfg(not(target_os = "linux"))]
    allocator::tune_late();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(addr))
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let router = Router::new()
        .route("/v1/encrypt", post(encrypt))
        .route("/v1/decrypt", post(decrypt))
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = TcpListener::bind(addr).await?;
    eprintln!(
        "{}",
        serde_json::json!({"message": "listening", "addr": listener.local_addr()?.to_string()})
    );
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1().timer(TokioTimer::new());
    http.http2().timer(TokioTimer::new());
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let service =
                tower::service_fn(move |req: http::Request<Incoming>| router.clone().oneshot(req));
            let _ = http
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .await;
        });
    }
}
