//! The accept loop: TCP, an optional TLS handshake, then HTTP/1.1 or HTTP/2
//! through hyper. Each request carries the peer address and, on mutual TLS, the
//! client's certificate identity. On shutdown the listener closes, every
//! connection finishes its requests in flight, and idle ones close.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::domain::identity::ClientIdentity;
use crate::http::Edge;
use crate::tls::{client_identity, ReloadableTls};

/// Longest a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's headers (HTTP/1.1).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `edge` on `listener` until `shutdown` completes, then waits up to
/// `grace` for connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    edge: Edge,
    tls: Option<Arc<ReloadableTls>>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    http.http2().timer(TokioTimer::new());
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
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            edge.clone(),
            tls.clone(),
            http.clone(),
            stop_rx.clone(),
        ));
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
    mut stop: watch::Receiver<bool>,
) {
    match tls {
        None => serve_http(TokioIo::new(stream), peer, None, edge, http, &mut stop).await,
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
            serve_http(TokioIo::new(stream), peer, identity, edge, http, &mut stop).await
        }
    }
}

async fn serve_http<IO>(
    io: TokioIo<IO>,
    peer: SocketAddr,
    identity: Option<ClientIdentity>,
    edge: Edge,
    http: auto::Builder<TokioExecutor>,
    stop: &mut watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let identity = identity.map(Arc::new);
    let service = tower::service_fn(move |req: http::Request<Incoming>| {
        let answer = edge.clone().handle(req, peer, identity.clone());
        async move { Ok::<_, std::convert::Infallible>(answer.await) }
    });
    let conn = http.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        _ = stop.changed() => {}
    }
    // Shutting down: finish requests in flight, then close.
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
