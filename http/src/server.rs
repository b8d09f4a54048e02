//! The accept loop of gantry's servers (`gantry serve` over TCP, `gantry
//! daemon` over unix sockets and TCP), built for the open internet's
//! clients, not only polite ones:
//! - request heads are bounded ([`MAX_HEAD`]) and must arrive within the
//!   header timeout, also between requests on a kept-alive connection, so
//!   a slow or silent client (slowloris) is closed, not waited on;
//! - connections past the cap are closed at once ([`raise_file_limit`]
//!   lets that many fit);
//! - a failed accept (out of file descriptors, a reset) does not stop it;
//! - on SIGTERM or SIGINT it stops accepting, closes the listener, lets
//!   requests in flight finish (up to the drain timeout) and returns.

use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The largest request head accepted (hyper's buffer bound).
pub const MAX_HEAD: usize = 64 << 10;

/// The bounds a server holds its clients to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a client may take to send a request head (and may stay
    /// idle between requests).
    pub header_timeout: Duration,
    /// Connections past this many are closed at once.
    pub max_connections: usize,
    /// How long requests in flight may take to finish after a signal.
    pub drain_timeout: Duration,
}

/// A bound socket the loop accepts from.
pub trait Listener: Send {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// Who connected, as the handler is told.
    type Peer: Clone + Send + Sync + 'static;
    fn accept(&mut self) -> impl Future<Output = std::io::Result<(Self::Io, Self::Peer)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Peer = std::net::SocketAddr;

    async fn accept(&mut self) -> std::io::Result<(Self::Io, Self::Peer)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Peer = ();

    async fn accept(&mut self) -> std::io::Result<(Self::Io, ())> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((stream, ()))
    }
}

/// Answers the connections `listener` accepts with `handler` until
/// SIGTERM or SIGINT; then prints `stopping` (to stderr), drains and
/// returns. The listener is closed before the drain.
pub async fn serve<L, H, F, B>(mut listener: L, limits: Limits, stopping: &str, handler: H)
where
    L: Listener,
    H: Fn(L::Peer, Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let handler = Arc::new(handler);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Ok((stream, peer)) = accepted else {
            // Out of file descriptors or a reset before accept: keep serving.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            drop(stream);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let answer = handler(peer.clone(), req);
            async move { Ok::<_, std::convert::Infallible>(answer.await) }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let open = open.clone();
        tokio::spawn(async move {
            let _ = conn.await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    eprintln!("{stopping}");
    let _ = tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await;
}

/// Lifts the soft limit on open files to the hard one, so thousands of
/// clients fit.
pub fn raise_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
}
