//! The accept loop: TCP, an optional TLS handshake, then HTTP/1.1 or HTTP/2
//! through hyper. Each request carries the peer address and, on mutual TLS, the
//! client's certificate identity. On shutdown the listener closes, every
//! connection finishes its requests in flight, and idle ones close.
//!
//! Connections are bounded ([`ConnectionLimits`]), so that whoever can open
//! TCP connections cannot take every slot:
//!
//! - at most `max_connections_per_address` at once from one client address:
//!   more are accepted and closed at once;
//! - a new connection must complete its TLS handshake and send its first
//!   request within `first_request_timeout`, or it is closed: a silent or
//!   half-open connection holds its slot for seconds, not the idle timeout;
//! - at most `max_connections` at once per listener. At the limit, the oldest
//!   connection that has not sent a request yet is closed to make room for
//!   the new one (a client that sends its request promptly is never starved
//!   by silent ones); failing that, where `evict_idle_at_limit` (the ops
//!   listener), the one idle the longest is closed gracefully; otherwise the
//!   loop stops accepting, and new connections wait in the kernel's listen
//!   queue until one closes;
//! - closed after `idle_timeout` without a request in flight, and closed
//!   gracefully at `max_age` (HTTP/2 GOAWAY; HTTP/1.1 with `Connection:
//!   close` on the answer in flight or, if idle, the next one, never between
//!   two requests; requests in flight finish, for at most the request time
//!   limit), so that a connection cannot outlive a revoked client certificate
//!   for longer than that: the next connection's handshake checks the CRL
//!   loaded then.
//!
//! The bookkeeping is per connection (a map entry at accept, removed at
//! close); requests pay nothing for it.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::domain::identity::ClientIdentity;
use crate::http::Edge;
use crate::tls::{client_identity, ReloadableTls};

/// Longest a client may take to send a request's headers (HTTP/1.1); the
/// first request of a connection has `first_request_timeout` instead.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How often, at most, refusals over the per-address limit are logged.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The bounds on one listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections served at once. At the limit, the oldest connection
    /// that has sent no request yet is closed to make room; if there is none,
    /// more wait to be accepted.
    pub max_connections: usize,
    /// Most connections served at once from one client address (the TCP
    /// peer); more are accepted and closed at once.
    pub max_connections_per_address: usize,
    /// A new connection that has not completed its TLS handshake and sent its
    /// first request this long after it got its slot is closed.
    pub first_request_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A connection open this long is closed gracefully.
    pub max_age: Duration,
    /// At `max_connections` with no silent connection to close, whether the
    /// connection idle the longest (no request in flight) is closed
    /// gracefully to make room, rather than new connections waiting. For the
    /// ops listener, whose clients (probes, scrapers) send idempotent GETs
    /// and reconnect at no cost; not for the API, where a client's POST
    /// racing the close of its idle keep-alive connection would fail.
    pub evict_idle_at_limit: bool,
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
    let tracker = Arc::new(Tracker::new(
        limits.max_connections_per_address,
        limits.evict_idle_at_limit,
    ));
    let open = metrics::gauge!("keyward_connections_open", "listener" => name);
    let waited = metrics::counter!("keyward_connection_limit_reached_total", "listener" => name);
    let dropped = Dropped::register(name);
    // Whether the listener is at its limit, so a burst is logged once.
    let mut at_limit = false;
    let mut refusal_logged: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
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
        // Over the per-address limit: closed at once (dropping the stream),
        // before it takes a slot or a byte is read from it.
        let Some(admitted) = tracker.admit(peer.ip()) else {
            dropped.address_limit.increment(1);
            if refusal_logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
                refusal_logged = Some(Instant::now());
                tracing::warn!(
                    listener = name,
                    max_connections_per_address = limits.max_connections_per_address,
                    "per-address connection limit reached: extra connections from that address are closed"
                );
            }
            continue;
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                at_limit = false;
                slot
            }
            Err(_) => {
                // Make room by closing the oldest connection that has sent
                // nothing yet (or, where allowed, the one idle the longest);
                // if there is none, this one waits for a slot, and those
                // behind it in the kernel's queue.
                match tracker.evict() {
                    Some(Evicted::Silent) => dropped.evicted_silent.increment(1),
                    Some(Evicted::Idle) => dropped.evicted_idle.increment(1),
                    None => {}
                }
                if !at_limit {
                    at_limit = true;
                    waited.increment(1);
                    tracing::warn!(
                        listener = name,
                        max_connections = limits.max_connections,
                        evict_idle = limits.evict_idle_at_limit,
                        "connection limit reached: the oldest connections that have sent no request are closed, otherwise new connections wait until one closes"
                    );
                }
                tokio::select! {
                    // Only a closed semaphore is an error, and nothing closes it.
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    _ = &mut shutdown => break,
                }
            }
        };
        // Its clocks (first request, idle, age) start now that it is served,
        // not while it waited for a slot.
        let activity = tracker.serving(&admitted);
        let _ = stream.set_nodelay(true);
        let open = open.clone();
        open.increment(1.0);
        let connection = connection(
            stream,
            peer,
            activity,
            edge.clone(),
            tls.clone(),
            http.clone(),
            limits,
            dropped.first_request_timeout.clone(),
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            connection.await;
            open.decrement(1.0);
            drop::<Admitted>(admitted);
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

/// `keyward_connections_dropped_total{listener, reason}`: connections closed
/// by the server before they were served. No client address is a label (the
/// series must not grow with the clients).
struct Dropped {
    /// Over `max_connections_per_address`: accepted and closed at once.
    address_limit: metrics::Counter,
    /// Closed at `max_connections` to make room, having sent no request.
    evicted_silent: metrics::Counter,
    /// Closed gracefully at `max_connections` to make room, being idle.
    evicted_idle: metrics::Counter,
    /// No TLS handshake and first request within `first_request_timeout`.
    first_request_timeout: metrics::Counter,
}

impl Dropped {
    fn register(listener: &'static str) -> Dropped {
        let counter = |reason: &'static str| metrics::counter!("keyward_connections_dropped_total", "listener" => listener, "reason" => reason);
        Dropped {
            address_limit: counter("address_limit"),
            evicted_silent: counter("evicted_silent"),
            evicted_idle: counter("evicted_idle"),
            first_request_timeout: counter("first_request_timeout"),
        }
    }
}

/// One listener's open connections: how many per client address, and which
/// may not have sent a request yet (oldest first), for eviction at the limit.
/// Touched at accept, at eviction and at close, never by a request.
struct Tracker {
    per_address: usize,
    inner: Mutex<TrackerInner>,
}

/// Which kind of connection [`Tracker::evict`] closed.
enum Evicted {
    /// One that had sent no request.
    Silent,
    /// One with no request in flight, idle the longest.
    Idle,
}

struct TrackerInner {
    next_id: u64,
    by_address: HashMap<IpAddr, usize>,
    /// Connections that had sent no request when last looked at, by accept
    /// order. One that has sent a request since is removed when eviction
    /// passes it, or when it closes; so the map never outgrows the open
    /// connections.
    maybe_silent: BTreeMap<u64, Arc<Activity>>,
    /// Every open connection, where idle ones may be evicted; else `None`.
    all: Option<BTreeMap<u64, Arc<Activity>>>,
}

/// A connection counted by its [`Tracker`]; uncounted on drop.
struct Admitted {
    tracker: Arc<Tracker>,
    id: u64,
    address: IpAddr,
}

impl Tracker {
    fn new(per_address: usize, evict_idle: bool) -> Tracker {
        Tracker {
            per_address,
            inner: Mutex::new(TrackerInner {
                next_id: 0,
                by_address: HashMap::new(),
                maybe_silent: BTreeMap::new(),
                all: evict_idle.then(BTreeMap::new),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TrackerInner> {
        // The sections below cannot panic halfway; a poisoned lock holds
        // consistent counts.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection from `address`, or `None` if that address
    /// already has `per_address` open. IPv4-mapped IPv6 addresses count as
    /// their IPv4 address.
    fn admit(self: &Arc<Self>, address: IpAddr) -> Option<Admitted> {
        let address = address.to_canonical();
        let mut inner = self.lock();
        let count = inner.by_address.entry(address).or_insert(0);
        if *count >= self.per_address {
            return None;
        }
        *count += 1;
        let id = inner.next_id;
        inner.next_id += 1;
        Some(Admitted {
            tracker: self.clone(),
            id,
            address,
        })
    }

    /// Starts serving an admitted connection (it has its slot): from now on
    /// it may be evicted, and its clocks run.
    fn serving(&self, admitted: &Admitted) -> Arc<Activity> {
        let activity = Arc::new(Activity::new());
        let mut inner = self.lock();
        inner.maybe_silent.insert(admitted.id, activity.clone());
        if let Some(all) = &mut inner.all {
            all.insert(admitted.id, activity.clone());
        }
        activity
    }

    /// Asks a served connection to close, to make room for a new one: the
    /// oldest that has sent no request, else, where allowed, the one with no
    /// request in flight that has been idle the longest.
    fn evict(&self) -> Option<Evicted> {
        let mut inner = self.lock();
        if Self::evict_oldest_silent(&mut inner) {
            return Some(Evicted::Silent);
        }
        let all = inner.all.as_mut()?;
        // At most `max_connections` entries: the ops listener's few.
        let (&id, _) = all
            .iter()
            .filter_map(|(id, activity)| Some((id, activity.idle_deadline(Duration::ZERO)?)))
            .min_by_key(|(_, idle_since)| *idle_since)?;
        let activity = all.remove(&id)?;
        activity.evict.notify_one();
        Some(Evicted::Idle)
    }

    fn evict_oldest_silent(inner: &mut TrackerInner) -> bool {
        let mut spoken = Vec::new();
        let mut victim = None;
        for (&id, activity) in inner.maybe_silent.iter() {
            if activity.ever_requested() {
                spoken.push(id);
            } else {
                victim = Some(id);
                break;
            }
        }
        for id in spoken {
            inner.maybe_silent.remove(&id);
        }
        let Some(victim) = victim else {
            return false;
        };
        if let Some(all) = &mut inner.all {
            all.remove(&victim);
        }
        match inner.maybe_silent.remove(&victim) {
            Some(activity) => {
                // A stored permit if the connection is not waiting right now.
                activity.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut inner = self.tracker.lock();
        inner.maybe_silent.remove(&self.id);
        if let Some(all) = &mut inner.all {
            all.remove(&self.id);
        }
        if let Some(count) = inner.by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                inner.by_address.remove(&self.address);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    activity: Arc<Activity>,
    edge: Edge,
    tls: Option<Arc<ReloadableTls>>,
    http: auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    first_request_timeouts: metrics::Counter,
    mut stop: watch::Receiver<bool>,
) {
    let first_request_due = activity.born + limits.first_request_timeout;
    match tls {
        None => {
            let io = TokioIo::new(stream);
            serve_http(
                io,
                peer,
                None,
                edge,
                http,
                limits,
                activity,
                first_request_timeouts,
                &mut stop,
            )
            .await
        }
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            // The handshake spends the first request's time.
            let handshake = tokio::time::timeout_at(first_request_due, acceptor.accept(stream));
            let stream = tokio::select! {
                result = handshake => match result {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        first_request_timeouts.increment(1);
                        tracing::debug!(%peer, "TLS handshake not done within the first-request timeout");
                        return;
                    }
                },
                _ = activity.evict.notified() => {
                    tracing::debug!(%peer, "connection limit reached: closed during its TLS handshake");
                    return;
                }
                _ = stop.changed() => return,
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| client_identity(leaf));
            let io = TokioIo::new(stream);
            serve_http(
                io,
                peer,
                identity,
                edge,
                http,
                limits,
                activity,
                first_request_timeouts,
                &mut stop,
            )
            .await
        }
    }
}

/// What a connection is doing, for its idle timeout, its first-request
/// timeout and eviction: requests in flight, and when the last one ended.
/// Each request touches it twice (two atomic operations and a clock read).
struct Activity {
    /// When the connection was accepted.
    born: Instant,
    in_flight: AtomicUsize,
    /// When the last request ended, in nanoseconds after `born` (at least 1
    /// once one has ended, so 0 means none has).
    last_ended: AtomicU64,
    /// Notified when the listener, at its limit, closes this connection to
    /// make room (only while it has sent no request).
    evict: Notify,
    /// Set once the connection reached its maximum age while idle: the next
    /// request to begin notifies `request_began`, and is the connection's
    /// last.
    closing_due: AtomicBool,
    request_began: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ended: AtomicU64::new(0),
            evict: Notify::new(),
            closing_due: AtomicBool::new(false),
            request_began: Notify::new(),
        }
    }

    /// When the connection will have been idle for `idle_timeout`, if nothing
    /// starts meanwhile; `None` while a request is in flight.
    fn idle_deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ended = Duration::from_nanos(self.last_ended.load(Ordering::Acquire));
        Some(self.born + ended + idle_timeout)
    }

    /// Whether a request has ever begun on the connection.
    fn ever_requested(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0 || self.last_ended.load(Ordering::Acquire) > 0
    }
}

/// Held while a request is in flight.
struct Busy(Arc<Activity>);

impl Busy {
    fn begin(activity: &Arc<Activity>) -> Busy {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        if activity.closing_due.load(Ordering::Acquire) {
            activity.request_began.notify_one();
        }
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let since_born = u64::try_from(self.0.born.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        // Stored before the count drops, so a reader that sees no request in
        // flight also sees when the last one ended.
        self.0.last_ended.fetch_max(since_born, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A streamed response's body, which keeps its request counted in flight
/// until it ends or is dropped.
struct InFlight {
    inner: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for InFlight {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why a connection is being closed.
#[derive(Debug, Clone, Copy)]
enum Closing {
    Shutdown,
    Idle,
    MaxAge,
    /// Evicted at the connection limit just as its first request began.
    Evicted,
}

#[allow(clippy::too_many_arguments)]
async fn serve_http<IO>(
    io: TokioIo<IO>,
    peer: SocketAddr,
    identity: Option<ClientIdentity>,
    edge: Edge,
    http: auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    activity: Arc<Activity>,
    first_request_timeouts: metrics::Counter,
    stop: &mut watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let identity = identity.map(Arc::new);
    let born = activity.born;
    let service = {
        let activity = activity.clone();
        tower::service_fn(move |req: http::Request<Incoming>| {
            let busy = Busy::begin(&activity);
            let http1 = req.version() < http::Version::HTTP_2;
            let answer = edge.clone().handle(req, peer, identity.clone());
            async move {
                let mut response = answer.await;
                // Past its maximum age, an HTTP/1.1 connection's answer says
                // it is the last, so the client sends no request into a
                // connection about to close (hyper then closes it).
                if http1 && busy.0.closing_due.load(Ordering::Acquire) {
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                // A streamed answer is in flight until its body ends (the
                // body holds `busy`); every other one ends here.
                if response
                    .extensions()
                    .get::<crate::http::Streamed>()
                    .is_some()
                {
                    return Ok(response
                        .map(|inner| axum::body::Body::new(InFlight { inner, _busy: busy })));
                }
                drop(busy);
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    let conn = http.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let too_old = tokio::time::sleep_until(born + limits.max_age);
    tokio::pin!(too_old);
    let first_request_due = tokio::time::sleep_until(born + limits.first_request_timeout);
    tokio::pin!(first_request_due);
    let mut awaiting_first_request = true;
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
            _ = &mut too_old => {
                // Closed with a request in flight, which HTTP/1.1 answers
                // with `Connection: close` (see the service above): closing
                // an idle kept-alive connection races the client's next
                // request, which then fails without an answer. So an idle
                // one waits for its next request (or its idle timeout).
                activity.closing_due.store(true, Ordering::Release);
                if activity.in_flight.load(Ordering::Acquire) > 0 {
                    break Closing::MaxAge;
                }
                let idle_at = activity
                    .idle_deadline(limits.idle_timeout)
                    .unwrap_or_else(Instant::now);
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                        return;
                    }
                    _ = stop.changed() => break Closing::Shutdown,
                    _ = activity.request_began.notified() => break Closing::MaxAge,
                    _ = tokio::time::sleep_until(idle_at) => break Closing::Idle,
                }
            }
            _ = &mut first_request_due, if awaiting_first_request => {
                awaiting_first_request = false;
                if !activity.ever_requested() {
                    // Nothing in flight, nothing owed: dropped, not closed
                    // gracefully (an HTTP/2 GOAWAY would wait for a client
                    // that does not read).
                    first_request_timeouts.increment(1);
                    tracing::debug!(%peer, "no request within the first-request timeout; closed");
                    return;
                }
            }
            _ = activity.evict.notified() => {
                if !activity.ever_requested() {
                    tracing::debug!(%peer, "connection limit reached: closed before its first request");
                    return;
                }
                break Closing::Evicted;
            }
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
        Closing::Idle | Closing::MaxAge | Closing::Evicted => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    /// An admitted, served connection from 127.0.0.1.
    fn served(tracker: &Arc<Tracker>) -> (Admitted, Arc<Activity>) {
        let admitted = tracker.admit(addr(1)).unwrap();
        let activity = tracker.serving(&admitted);
        (admitted, activity)
    }

    #[test]
    fn one_address_is_refused_over_its_limit_and_admitted_again_after_a_close() {
        let tracker = Arc::new(Tracker::new(2, false));
        let a = tracker.admit(addr(3)).unwrap();
        let _b = tracker.admit(addr(3)).unwrap();
        assert!(tracker.admit(addr(3)).is_none());
        // The same address written as IPv4-mapped IPv6 is the same client.
        let mapped: IpAddr = "::ffff:127.0.0.3".parse().unwrap();
        assert!(tracker.admit(mapped).is_none());
        let _other = tracker.admit(addr(2)).unwrap();
        drop(a);
        assert!(tracker.admit(addr(3)).is_some());
    }

    #[test]
    fn eviction_takes_the_oldest_silent_connection_never_one_that_asked() {
        let tracker = Arc::new(Tracker::new(10, false));
        let (_a, asked) = served(&tracker);
        drop(Busy::begin(&asked));
        let (_b, oldest_silent) = served(&tracker);
        let (_c, younger_silent) = served(&tracker);
        // Admitted but still waiting for a slot: not a candidate.
        let _waiting = tracker.admit(addr(1)).unwrap();
        assert!(matches!(tracker.evict(), Some(Evicted::Silent)));
        assert!(oldest_silent.evict.notified_now());
        assert!(matches!(tracker.evict(), Some(Evicted::Silent)));
        assert!(younger_silent.evict.notified_now());
        // Only one that asked is left: no one to evict on the API listener.
        assert!(tracker.evict().is_none());
        assert!(!asked.evict.notified_now());
    }

    #[test]
    fn where_allowed_eviction_then_takes_the_connection_idle_the_longest() {
        let tracker = Arc::new(Tracker::new(10, true));
        let (_a, idle_longest) = served(&tracker);
        let (_b, busy) = served(&tracker);
        let (_c, idle_recently) = served(&tracker);
        drop(Busy::begin(&idle_longest));
        let _in_flight = Busy::begin(&busy);
        std::thread::sleep(Duration::from_millis(5));
        drop(Busy::begin(&idle_recently));
        assert!(matches!(tracker.evict(), Some(Evicted::Idle)));
        assert!(idle_longest.evict.notified_now());
        assert!(matches!(tracker.evict(), Some(Evicted::Idle)));
        assert!(idle_recently.evict.notified_now());
        // A connection with a request in flight is never evicted.
        assert!(tracker.evict().is_none());
        assert!(!busy.evict.notified_now());
    }

    #[test]
    fn a_closed_connection_leaves_nothing_behind() {
        let tracker = Arc::new(Tracker::new(10, true));
        let (a, _) = served(&tracker);
        let waiting = tracker.admit(addr(2)).unwrap();
        drop(a);
        drop(waiting);
        let inner = tracker.lock();
        assert!(inner.by_address.is_empty());
        assert!(inner.maybe_silent.is_empty());
        assert!(inner.all.as_ref().unwrap().is_empty());
    }

    trait NotifiedNow {
        fn notified_now(&self) -> bool;
    }

    impl NotifiedNow for Notify {
        /// Whether a notification is stored.
        fn notified_now(&self) -> bool {
            let notified = self.notified();
            tokio::pin!(notified);
            notified.as_mut().enable()
        }
    }
}
