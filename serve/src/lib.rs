//! `gantry serve`: a registry server on hyper and tokio.
//!
//! The handlers ([`api`]) answer the distribution spec's read API from a
//! [`storage::Storage`]; today that is a gantry store's content
//! ([`from_store`]). The server around them is `gantry-http`'s accept
//! loop, built for the open internet's clients, not only polite ones:
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
pub mod token;
pub mod v1;

use gantry_http::server;
use std::io::Write;
use std::net::SocketAddr;
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
    /// HTTPS (and HTTP/2) with this certificate, reloaded on SIGHUP.
    pub tls: Option<Arc<server::TlsFiles>>,
}

impl Options {
    pub fn new(listen: SocketAddr) -> Options {
        Options {
            listen,
            header_timeout: Duration::from_secs(10),
            max_connections: 16_384,
            drain_timeout: Duration::from_secs(10),
            threads: None,
            tls: None,
        }
    }
}

/// Serves `storage` until SIGTERM or SIGINT. `ready` is called with the
/// bound address once the socket listens (port 0 picks a free port).
pub fn run(options: Options, backend: api::Backend, ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    server::raise_file_limit();
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
    let limits = server::Limits {
        header_timeout: options.header_timeout,
        max_connections: options.max_connections,
        drain_timeout: options.drain_timeout,
    };
    let stopping = "gantry serve: shutting down, letting requests in flight finish";
    server::serve_tls(listener, limits, stopping, options.tls.clone(), move |peer, req| {
        let backend = backend.clone();
        async move {
            let started = Instant::now();
            let (method, target) = (req.method().clone(), req.uri().clone());
            let resp = api::handle(&backend, req).await;
            log(peer, &method, &target, &resp, started);
            resp
        }
    })
    .await;
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
