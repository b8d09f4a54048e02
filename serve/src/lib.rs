//! `gantry serve`: a registry server on hyper and tokio.
//!
//! The handlers ([`api`]) answer the distribution spec's read API from a
//! [`storage::Storage`]; today that is a gantry store's content
//! ([`from_store`]). The server around them is built for the open
//! internet's clients, not only polite ones:
//! - request heads are bounded (64 KiB) and must arrive within
//!   `header_timeout` — also between requests on a kept-alive connection —
//!   so a slow or silent client (slowloris) is closed, not waited on;
//! - connections past `max_connections` are closed at once, and the file
//!   limit is raised so that many fit;
//! - on SIGTERM or SIGINT it stops accepting, lets requests in flight
//!   finish (up to `drain_timeout`), and exits 0;
//! - one access-log line per request, untrusted text escaped;
//! - every answer says `X-Content-Type-Options: nosniff` (see `api`);
//! - a registry of its own removes expired upload sessions in the
//!   background.

pub mod api;
pub mod from_store;
pub mod fs_storage;
pub mod htpasswd;
pub mod mirror;
mod push;
pub mod storage;
pub mod v1;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("starting the server: {0}")]
    Runtime(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    /// How long a client may take to send a request head (and may stay
    /// idle between requests).
    pub header_timeout: Duration,
    pub max_connections: usize,
    /// How long requests in flight may take to finish after a signal.
    pub drain_timeout: Duration,
    /// Worker threads (default: one per core).
    pub threads: Option<usize>,
}

impl Options {
    pub fn new(listen: SocketAddr) -> Options {
        Options {
            listen,
            header_timeout: Duration::from_secs(10),
            max_connections: 16_384,
            drain_timeout: Duration::from_secs(10),
            threads: None,
        }
    }
}

/// The largest request head accepted (hyper's buffer bound).
const MAX_HEAD: usize = 64 << 10;

/// Serves `storage` until SIGTERM or SIGINT. `ready` is called with the
/// bound address once the socket listens (port 0 picks a free port).
pub fn run(options: Options, backend: api::Backend, ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    raise_file_limit();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = options.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.enable_all().build().map_err(ServeError::Runtime)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|source| ServeError::Listen {
                addr: options.listen,
                source,
            })?;
        let bound = listener.local_addr().map_err(ServeError::Runtime)?;
        ready(bound);
        serve(listener, options, Arc::new(backend)).await;
        Ok(())
    })
}

async fn serve(listener: tokio::net::TcpListener, options: Options, backend: Arc<api::Backend>) {
    if let api::Backend::Registry { storage, .. } = &*backend {
        sweep_uploads(storage.clone());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let http = Arc::new(http);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            // Out of file descriptors or a reset before accept: keep serving.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= options.max_connections {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        let backend = backend.clone();
        let service = service_fn(move |req| {
            let backend = backend.clone();
            async move {
                let started = Instant::now();
                let (method, target) = (req.method().clone(), req.uri().clone());
                let resp = api::handle(&backend, req).await;
                log(peer, &method, &target, &resp, started);
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        let open = open.clone();
        tokio::spawn(async move {
            let _ = conn.await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    eprintln!("gantry serve: shutting down, letting requests in flight finish");
    let _ = tokio::time::timeout(options.drain_timeout, graceful.shutdown()).await;
}

/// Removes expired upload sessions, with their files, every quarter of the
/// expiry (at most a minute apart), so abandoned sessions go even when no
/// one starts another.
fn sweep_uploads(storage: Arc<fs_storage::FsStorage>) {
    let every = (storage.upload_limits().expiry / 4).clamp(Duration::from_millis(250), Duration::from_secs(60));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let s = storage.clone();
            let _ = tokio::task::spawn_blocking(move || s.sweep_uploads()).await;
        }
    });
}

/// One line per request: peer, method, path and query (escaped), status,
/// body length, time to answer.
fn log(
    peer: SocketAddr,
    method: &hyper::Method,
    uri: &hyper::Uri,
    resp: &hyper::Response<api::Body>,
    started: Instant,
) {
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
    let len = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let line = format!(
        "{peer} \"{} {}\" {} {len} {:.1}ms\n",
        method,
        gantry_core::text::escape_line(target),
        resp.status().as_u16(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Lifts the soft limit on open files to the hard one, so thousands of
/// clients fit (the daemon's server uses it too).
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

/// Decodes `%XX` escapes (a path segment or a query value whose `+` the
/// caller has already turned into a space); a malformed escape stays as it
/// is. Shared with the daemon's routes.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
