//! The ACME challenge listener, apart from the API listener: `tls-alpn-01`
//! (a self-signed certificate for the domain carrying the key
//! authorization's digest, RFC 8737, offered only with ALPN `acme-tls/1`) or
//! `http-01` (`GET /.well-known/acme-challenge/TOKEN`, RFC 8555 §8.3).
//!
//! It is reachable by anyone, so: the responses are read from the database
//! at most once a second whatever the traffic, at most [`MAX_CONNECTIONS`]
//! connections are served at once, each for at most [`CONNECTION_TIMEOUT`];
//! it answers nothing but pending challenges (public by design).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::{Request, Response, StatusCode};
use rcgen::{CertificateParams, CustomExtension, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::crypto::sha256;
use crate::store::{AcmeChallengeRow, Store};

/// Which ACME challenge Keyward answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// `tls-alpn-01`: a TLS handshake with ALPN `acme-tls/1` on port 443.
    TlsAlpn01,
    /// `http-01`: `GET /.well-known/acme-challenge/TOKEN` on port 80.
    Http01,
}

impl ChallengeKind {
    pub(super) fn acme_type(self) -> instant_acme::ChallengeType {
        match self {
            ChallengeKind::TlsAlpn01 => instant_acme::ChallengeType::TlsAlpn01,
            ChallengeKind::Http01 => instant_acme::ChallengeType::Http01,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Http01 => "http-01",
        }
    }
}

/// Most challenge connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// Longest one challenge connection is served.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read of the pending responses is reused.
const REFRESH: Duration = Duration::from_secs(1);
/// The ALPN protocol of tls-alpn-01.
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The pending challenge responses, read from the database at most once per
/// [`REFRESH`].
pub struct Challenges {
    store: Store,
    cache: tokio::sync::Mutex<Option<(Instant, Arc<Vec<AcmeChallengeRow>>)>>,
    /// Self-signed tls-alpn-01 certificates made, by key authorization.
    made: Mutex<Vec<(String, Arc<rustls::sign::CertifiedKey>)>>,
}

impl Challenges {
    /// Reads from `store`.
    pub fn new(store: Store) -> Challenges {
        Challenges {
            store,
            cache: tokio::sync::Mutex::new(None),
            made: Mutex::new(Vec::new()),
        }
    }

    async fn current(&self) -> Arc<Vec<AcmeChallengeRow>> {
        let mut cache = self.cache.lock().await;
        if let Some((at, rows)) = cache.as_ref() {
            if at.elapsed() < REFRESH {
                return rows.clone();
            }
        }
        let rows = match self.store.acme_challenges().await {
            Ok(rows) => Arc::new(rows),
            Err(e) => {
                tracing::warn!(error = %e, "ACME challenge: cannot read the pending responses");
                Arc::new(Vec::new())
            }
        };
        *cache = Some((Instant::now(), rows.clone()));
        rows
    }

    /// The key authorization for http-01 token `token`.
    async fn by_token(&self, token: &str) -> Option<String> {
        self.current()
            .await
            .iter()
            .find(|c| c.token == token)
            .map(|c| c.key_authorization.clone())
    }

    /// The tls-alpn-01 certificate for `domain`, if a challenge is pending.
    async fn alpn_cert(&self, domain: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let pending = self.current().await;
        let challenge = pending
            .iter()
            .find(|c| c.domain.eq_ignore_ascii_case(domain))?;
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, key)) = made
            .iter()
            .find(|(ka, _)| *ka == challenge.key_authorization)
        {
            return Some(key.clone());
        }
        let key = match alpn_certificate(&challenge.domain, &challenge.key_authorization) {
            Ok(key) => Arc::new(key),
            Err(e) => {
                tracing::warn!(error = %e, "ACME challenge: cannot make the tls-alpn-01 certificate");
                return None;
            }
        };
        // Bounded: only the latest few (one per domain of an order).
        if made.len() >= 16 {
            made.remove(0);
        }
        made.push((challenge.key_authorization.clone(), key.clone()));
        Some(key)
    }
}

/// The RFC 8737 certificate: self-signed for `domain`, with the critical
/// acmeIdentifier extension holding SHA-256 of the key authorization.
fn alpn_certificate(
    domain: &str,
    key_authorization: &str,
) -> Result<rustls::sign::CertifiedKey, String> {
    let mut params = CertificateParams::new(vec![domain.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(&sha256(
        key_authorization.as_bytes(),
    ))];
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    crate::tls::ManagedCert::certified_key(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
}

/// Serves challenges on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    kind: ChallengeKind,
    challenges: Arc<Challenges>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "ACME challenge: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        // At the limit, the connection is closed at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let challenges = challenges.clone();
        tokio::spawn(async move {
            let served = match kind {
                ChallengeKind::TlsAlpn01 => {
                    tokio::time::timeout(CONNECTION_TIMEOUT, serve_alpn(stream, challenges)).await
                }
                ChallengeKind::Http01 => {
                    tokio::time::timeout(CONNECTION_TIMEOUT, serve_http(stream, challenges)).await
                }
            };
            if let Ok(Err(e)) = served {
                tracing::debug!(error = %e, "ACME challenge connection");
            }
            drop(slot);
        });
    }
}

async fn serve_alpn(stream: TcpStream, challenges: Arc<Challenges>) -> Result<(), String> {
    let acceptor =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = acceptor.await.map_err(|e| e.to_string())?;
    let hello = start.client_hello();
    let offers_acme = hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
    let Some(domain) = hello.server_name().map(str::to_string) else {
        return Err("no server name".into());
    };
    if !offers_acme {
        return Err("not an acme-tls/1 handshake".into());
    }
    let Some(key) = challenges.alpn_cert(&domain).await else {
        return Err("no challenge pending for that name".into());
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(Fixed(key)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    let mut tls = start
        .into_stream(Arc::new(config))
        .await
        .map_err(|e| e.to_string())?;
    // The validation ends with the handshake; close cleanly.
    use tokio::io::AsyncWriteExt;
    let _ = tls.shutdown().await;
    Ok(())
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

async fn serve_http(stream: TcpStream, challenges: Arc<Challenges>) -> Result<(), String> {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let challenges = challenges.clone();
        async move {
            let token = req
                .uri()
                .path()
                .strip_prefix("/.well-known/acme-challenge/")
                .filter(|t| !t.is_empty() && t.len() <= 256)
                .map(str::to_string);
            let answer = match token {
                Some(token) if req.method() == hyper::Method::GET => {
                    challenges.by_token(&token).await
                }
                _ => None,
            };
            match answer {
                Some(ka) => Response::builder()
                    .header("content-type", "application/octet-stream")
                    .body(Body::from(ka)),
                None => Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(Body::empty()),
            }
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
        .map_err(|e| e.to_string())
}
