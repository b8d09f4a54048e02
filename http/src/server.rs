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
//!   requests in flight finish (up to the drain timeout) and returns;
//! - with TLS ([`TlsFiles`], rustls) the handshake runs on the
//!   connection's own task within the header timeout, HTTP/2 is spoken
//!   when the client offers it (ALPN `h2`), and SIGHUP reads the
//!   certificate and key again: new connections get the new pair,
//!   connections already open keep theirs, and a pair that does not load
//!   leaves the old one in place.

use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Streams one HTTP/2 connection may have open at once.
const MAX_STREAMS: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the certificate {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("reading the key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the certificate {cert} and the key {key} do not make a server identity: {reason}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// A server's certificate chain and key, from PEM files, as the TLS
/// configuration new connections get; [`TlsFiles::reload`] reads them
/// again.
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// Reads `cert` (the chain, leaf first) and `key`.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsFiles, TlsError> {
        Ok(TlsFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(server_config(cert, key)?)),
        })
    }

    /// Reads the files again; on an error the pair in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(server_config(&self.cert, &self.key)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cert.to_path_buf(),
        reason,
    };
    let chain = crate::trust::pem_certificates(cert).map_err(cert_err)?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let pair = |reason: String| TlsError::Pair {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| pair(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| pair(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

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
pub async fn serve<L, H, F, B>(listener: L, limits: Limits, stopping: &str, handler: H)
where
    L: Listener,
    H: Fn(L::Peer, Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_tls(listener, limits, stopping, None, handler).await
}

/// [`serve`], over TLS when `tls` is given (and then reloading it on
/// SIGHUP, saying so on stderr).
pub async fn serve_tls<L, H, F, B>(
    mut listener: L,
    limits: Limits,
    stopping: &str,
    tls: Option<Arc<TlsFiles>>,
    handler: H,
) where
    L: Listener,
    H: Fn(L::Peer, Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    // SIGHUP is taken only to reload a certificate; otherwise it stays fatal.
    let mut hup = tls.as_ref().and_then(|_| signal(SignalKind::hangup()).ok());
    let who = stopping.split(':').next().unwrap_or("server");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD as u32)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Some(limits.header_timeout))
        .keep_alive_timeout(limits.header_timeout);
    let handler = Arc::new(handler);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = next(&mut term) => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = next(&mut hup) => {
                if let Some(t) = &tls {
                    match t.reload() {
                        Ok(()) => eprintln!("{who}: reloaded the TLS certificate"),
                        Err(e) => eprintln!("{who}: keeping the TLS certificate in use: {e}"),
                    }
                }
                continue;
            }
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
        // What the connection is doing: an HTTP/2 connection without a
        // stream for a header timeout is closed (HTTP/1.1's own header
        // timeout covers it there).
        let activity = Arc::new(Activity::new());
        let busy = activity.clone();
        let service = service_fn(move |req| {
            let guard = Busy::start(busy.clone());
            let answer = handler(peer.clone(), req);
            async move {
                let resp = answer.await;
                // The stream is busy until its body is sent (or dropped).
                Ok::<_, std::convert::Infallible>(resp.map(|inner| Tracked { inner, _guard: guard }))
            }
        });
        let watcher = graceful.watcher();
        let (http1, http2) = (http1.clone(), http2.clone());
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let open = open.clone();
        tokio::spawn(async move {
            match acceptor {
                None => {
                    let _ = watcher
                        .watch(http1.serve_connection(TokioIo::new(stream), service))
                        .await;
                }
                // A client that does not finish its handshake in time is
                // closed like one that does not send its request head.
                Some(acceptor) => {
                    if let Ok(Ok(tls)) = tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                            let conn = watcher.watch(http2.serve_connection(TokioIo::new(tls), service));
                            tokio::pin!(conn);
                            let tick = (limits.header_timeout / 4).max(Duration::from_millis(100));
                            loop {
                                tokio::select! {
                                    _ = &mut conn => break,
                                    _ = tokio::time::sleep(tick) => {
                                        if activity.idle_for() > limits.header_timeout {
                                            // Dropped: no stream is open to lose.
                                            break;
                                        }
                                    }
                                }
                            }
                        } else {
                            let _ = watcher.watch(http1.serve_connection(TokioIo::new(tls), service)).await;
                        }
                    }
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    eprintln!("{stopping}");
    let _ = tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await;
}

/// Requests of one connection in flight (a response counts until its body
/// is sent or dropped), and when the last one ended.
struct Activity {
    inflight: AtomicUsize,
    since: std::sync::Mutex<std::time::Instant>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            inflight: AtomicUsize::new(0),
            since: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// How long the connection has had nothing in flight (zero while it has).
    fn idle_for(&self) -> Duration {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.since.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }
}

/// One request in flight, until dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(a: Arc<Activity>) -> Busy {
        a.inflight.fetch_add(1, Ordering::AcqRel);
        Busy(a)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.since.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted in flight.
struct Tracked<B> {
    inner: B,
    _guard: Busy,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The next delivery of a signal stream, or never without one.
async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
    match s.as_mut() {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
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
