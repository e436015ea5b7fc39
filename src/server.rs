//! The accept loop: TCP, an optional TLS handshake, then HTTP/1.1 or HTTP/2
//! through hyper. Each request carries the peer address and, on mutual TLS, the
//! client's certificate identity. On shutdown the listener closes, every
//! connection finishes its requests in flight, and idle ones close.
//!
//! Connections are bounded ([`ConnectionLimits`]): at most `max_connections`
//! at once per listener (over it, the loop stops accepting and new
//! connections wait in the kernel's listen queue), closed after
//! `idle_timeout` without a request in flight, and closed gracefully at
//! `max_age` (HTTP/2 GOAWAY, HTTP/1.1 after its current response; requests in
//! flight finish, for at most the request time limit), so that a connection
//! cannot outlive a revoked client certificate for longer than that: the next
//! connection's handshake checks the CRL loaded then.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::domain::identity::ClientIdentity;
use crate::http::Edge;
use crate::tls::{client_identity, ReloadableTls};

/// Longest a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's headers (HTTP/1.1).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The bounds on one listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A connection open this long is closed gracefully.
    pub max_age: Duration,
    /// How long a connection being closed for its age or idleness may take
    /// to finish its requests before it is dropped: a client that stops
    /// reading its answers would otherwise hold its slot for ever. The
    /// request time limit, which bounds every request anyway.
    pub closing_grace: Duration,
}

/// Serves `edge` on `listener` (called `name` in metrics and logs) until
/// `shutdown` completes, then waits up to `grace` for connections to finish
/// their requests.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    edge: Edge,
    tls: Option<Arc<ReloadableTls>>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    http.http2().timer(TokioTimer::new());
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open = metrics::gauge!("keyward_connections_open", "listener" => name);
    let waited = metrics::counter!("keyward_connection_limit_reached_total", "listener" => name);
    // Whether the loop is waiting for a slot, so a burst is logged once.
    let mut at_limit = false;
    tokio::pin!(shutdown);
    loop {
        // A slot first, then the connection: over the limit, connections
        // wait in the kernel's queue rather than being accepted and held.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                at_limit = false;
                slot
            }
            Err(_) => {
                if !at_limit {
                    at_limit = true;
                    waited.increment(1);
                    tracing::warn!(
                        listener = name,
                        max_connections = limits.max_connections,
                        "connection limit reached: new connections wait until one closes"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    _ = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let open = open.clone();
        open.increment(1.0);
        let connection = connection(
            stream,
            peer,
            edge.clone(),
            tls.clone(),
            http.clone(),
            limits,
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            connection.await;
            open.decrement(1.0);
            drop::<OwnedSemaphorePermit>(slot);
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing requests in flight");
    let _ = stop_tx.send(true);
    drop(stop_rx);
    // `closed` completes when every connection task has dropped its receiver.
    if tokio::time::timeout(grace, stop_tx.closed()).await.is_err() {
        tracing::warn!("requests still in flight after the shutdown timeout; stopping anyway");
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    edge: Edge,
    tls: Option<Arc<ReloadableTls>>,
    http: auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    let born = Instant::now();
    match tls {
        None => {
            let io = TokioIo::new(stream);
            serve_http(io, peer, None, edge, http, limits, born, &mut stop).await
        }
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let stream = tokio::select! {
                result = handshake => match result {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                _ = stop.changed() => return,
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| client_identity(leaf));
            let io = TokioIo::new(stream);
            serve_http(io, peer, identity, edge, http, limits, born, &mut stop).await
        }
    }
}

/// What a connection is doing, for its idle timeout: requests in flight, and
/// when the last one ended. Each request touches it twice (two atomic
/// operations and a clock read).
struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    /// When the last request ended, in nanoseconds after `born`.
    last_ended: AtomicU64,
}

impl Activity {
    /// When the connection will have been idle for `idle_timeout`, if nothing
    /// starts meanwhile; `None` while a request is in flight.
    fn idle_deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ended = Duration::from_nanos(self.last_ended.load(Ordering::Acquire));
        Some(self.born + ended + idle_timeout)
    }
}

/// Held while a request is in flight.
struct Busy(Arc<Activity>);

impl Busy {
    fn begin(activity: &Arc<Activity>) -> Busy {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let since_born = u64::try_from(self.0.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // Stored before the count drops, so a reader that sees no request in
        // flight also sees when the last one ended.
        self.0.last_ended.fetch_max(since_born, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a connection is being closed.
#[derive(Debug, Clone, Copy)]
enum Closing {
    Shutdown,
    Idle,
    MaxAge,
}

#[allow(clippy::too_many_arguments)]
async fn serve_http<IO>(
    io: TokioIo<IO>,
    peer: SocketAddr,
    identity: Option<ClientIdentity>,
    edge: Edge,
    http: auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    born: Instant,
    stop: &mut watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let identity = identity.map(Arc::new);
    let activity = Arc::new(Activity {
        born,
        in_flight: AtomicUsize::new(0),
        last_ended: AtomicU64::new(0),
    });
    let service = {
        let activity = activity.clone();
        tower::service_fn(move |req: http::Request<Incoming>| {
            let busy = Busy::begin(&activity);
            let answer = edge.clone().handle(req, peer, identity.clone());
            async move {
                let response = answer.await;
                drop(busy);
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    let conn = http.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let too_old = tokio::time::sleep_until(born + limits.max_age);
    tokio::pin!(too_old);
    let closing = loop {
        // While a request is in flight, look again one idle timeout later.
        let idle_at = activity
            .idle_deadline(limits.idle_timeout)
            .unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed() => break Closing::Shutdown,
            _ = &mut too_old => break Closing::MaxAge,
            _ = tokio::time::sleep_until(idle_at) => {
                if activity
                    .idle_deadline(limits.idle_timeout)
                    .is_some_and(|at| at <= Instant::now())
                {
                    break Closing::Idle;
                }
            }
        }
    };
    tracing::debug!(%peer, reason = ?closing, "closing the connection");
    // Finish requests in flight (HTTP/2: GOAWAY, then the open streams), then
    // close. At shutdown the server's own grace period bounds this.
    conn.as_mut().graceful_shutdown();
    let result = match closing {
        Closing::Shutdown => conn.await,
        Closing::Idle | Closing::MaxAge => {
            match tokio::time::timeout(limits.closing_grace, conn).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::debug!(%peer, "connection still busy after closing; dropped");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
