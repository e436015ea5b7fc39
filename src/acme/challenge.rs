//! The ACME challenge listener, apart from the API listener: `tls-alpn-01`
//! (a self-signed certificate for the domain carrying the key
//! authorization's digest, RFC 8737, offered only with ALPN `acme-tls/1`) or
//! `http-01` (`GET /.well-known/acme-challenge/TOKEN`, RFC 8555 §8.3).
//!
//! It is reachable by anyone, so: the responses are read from the database
//! at most once a second whatever the traffic; it answers nothing but
//! pending challenges (public by design); and its connections are bounded so
//! that nobody can hold it while the CA's validation waits outside:
//! - at most [`MAX_CONNECTIONS`] at once, each served for at most
//!   [`CONNECTION_TIMEOUT`], one request each (http-01 without keep-alive);
//! - at most [`MAX_PER_ADDRESS`] from one address (an IPv6 /64 counting as one);
//! - a connection that sends nothing within [`FIRST_BYTE_TIMEOUT`] is closed;
//! - when all slots are taken, a new connection takes the slot of the oldest
//!   one that has not sent a byte yet (closed), rather than being refused; it
//!   is refused only when every slot is serving one that did.
//!
//! So an attacker who opens connections and sends nothing loses them to the
//! CA's validation; one who sends a byte and stalls holds at most
//! [`MAX_PER_ADDRESS`] slots per address for [`CONNECTION_TIMEOUT`] each.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::{Request, Response, StatusCode};
use rcgen::{CertificateParams, CustomExtension, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

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

/// Most challenge connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Most challenge connections open at once from one address (IPv4), or one
/// /64 (IPv6). A CA validates from a handful of addresses, a few
/// connections each.
pub const MAX_PER_ADDRESS: usize = 8;
/// A connection that sends no byte within this is closed.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(3);
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

/// The open challenge connections (at most [`MAX_CONNECTIONS`]: scanned
/// linearly).
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: Vec<Open>,
}

struct Open {
    id: u64,
    /// The peer's address as counted ([`address_key`]).
    address: IpAddr,
    accepted: Instant,
    /// Whether it has sent a byte.
    started: Arc<AtomicBool>,
    /// Ends its task (set right after the spawn).
    task: Option<tokio::task::AbortHandle>,
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Its address has [`MAX_PER_ADDRESS`] open.
    PerAddress,
    /// Every slot serves a connection that has sent a byte.
    Full,
}

impl Connections {
    /// Admits a connection from `address`, evicting the oldest one that has
    /// sent nothing when every slot is taken. Returns its id and started flag.
    fn admit(&mut self, address: IpAddr) -> Result<(u64, Arc<AtomicBool>), Refusal> {
        if self.open.iter().filter(|o| o.address == address).count() >= MAX_PER_ADDRESS {
            return Err(Refusal::PerAddress);
        }
        if self.open.len() >= MAX_CONNECTIONS {
            let oldest_idle = self
                .open
                .iter()
                .enumerate()
                .filter(|(_, o)| !o.started.load(Ordering::Acquire))
                .min_by_key(|(_, o)| o.accepted)
                .map(|(i, _)| i)
                .ok_or(Refusal::Full)?;
            let evicted = self.open.swap_remove(oldest_idle);
            if let Some(task) = evicted.task {
                task.abort();
            }
            metrics::counter!("keyward_acme_challenge_connections_closed_total", "reason" => "evicted_idle").increment(1);
        }
        self.next_id += 1;
        let started = Arc::new(AtomicBool::new(false));
        self.open.push(Open {
            id: self.next_id,
            address,
            accepted: Instant::now(),
            started: started.clone(),
            task: None,
        });
        Ok((self.next_id, started))
    }

    fn set_task(&mut self, id: u64, task: tokio::task::AbortHandle) {
        if let Some(o) = self.open.iter_mut().find(|o| o.id == id) {
            o.task = Some(task);
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(i) = self.open.iter().position(|o| o.id == id) {
            self.open.swap_remove(i);
        }
    }
}

/// The address a connection counts against: IPv4 as is, IPv6 by its /64
/// (one host usually holds a whole /64).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Removes its connection from the table when its task ends (or is
/// aborted).
struct Slot {
    connections: Arc<Mutex<Connections>>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.connections).remove(self.id);
    }
}

fn lock(connections: &Mutex<Connections>) -> std::sync::MutexGuard<'_, Connections> {
    connections.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves challenges on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    kind: ChallengeKind,
    challenges: Arc<Challenges>,
    mut shutdown: watch::Receiver<bool>,
) {
    let connections: Arc<Mutex<Connections>> = Arc::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "ACME challenge: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let admitted = lock(&connections).admit(address_key(peer.ip()));
        let (id, started) = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                // Closed at once.
                let reason = match refusal {
                    Refusal::PerAddress => "per_address",
                    Refusal::Full => "full",
                };
                metrics::counter!("keyward_acme_challenge_connections_closed_total", "reason" => reason).increment(1);
                tracing::debug!(%peer, reason, "ACME challenge connection refused");
                continue;
            }
        };
        let slot = Slot {
            connections: connections.clone(),
            id,
        };
        let challenges = challenges.clone();
        let task = tokio::spawn(async move {
            let _slot = slot;
            let mut first = [0u8; 1];
            match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => started.store(true, Ordering::Release),
                Ok(_) => return,
                Err(_) => {
                    metrics::counter!("keyward_acme_challenge_connections_closed_total", "reason" => "first_byte_timeout").increment(1);
                    return;
                }
            }
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
        });
        lock(&connections).set_task(id, task.abort_handle());
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
    // One request per connection: a kept-alive connection would hold a
    // slot as if it had never been idle.
    hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        address_key(s.parse().unwrap())
    }

    #[test]
    fn one_address_gets_at_most_its_share() {
        let mut c = Connections::default();
        for _ in 0..MAX_PER_ADDRESS {
            c.admit(ip("192.0.2.1")).unwrap();
        }
        assert_eq!(c.admit(ip("192.0.2.1")).unwrap_err(), Refusal::PerAddress);
        c.admit(ip("192.0.2.2")).unwrap();
        // An IPv6 /64 is one address.
        for i in 0..MAX_PER_ADDRESS {
            c.admit(ip(&format!("2001:db8:0:1::{:x}", i + 1))).unwrap();
        }
        assert_eq!(
            c.admit(ip("2001:db8:0:1:ffff::1")).unwrap_err(),
            Refusal::PerAddress
        );
        c.admit(ip("2001:db8:0:2::1")).unwrap();
    }

    #[test]
    fn when_full_the_oldest_silent_connection_makes_room_and_busy_ones_do_not() {
        let mut c = Connections::default();
        let mut flags = Vec::new();
        for i in 0..MAX_CONNECTIONS {
            let (id, started) = c.admit(ip(&format!("10.0.{}.{}", i / 8, i % 8))).unwrap();
            flags.push((id, started));
        }
        // The first one has sent a byte; the second is the oldest silent one.
        flags[0].1.store(true, Ordering::Release);
        c.admit(ip("10.9.9.9")).unwrap();
        let open: Vec<u64> = c.open.iter().map(|o| o.id).collect();
        assert!(open.contains(&flags[0].0));
        assert!(!open.contains(&flags[1].0));
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        // Every slot busy: a new one is refused.
        for o in &c.open {
            o.started.store(true, Ordering::Release);
        }
        assert_eq!(c.admit(ip("10.9.9.10")).unwrap_err(), Refusal::Full);
    }
}
