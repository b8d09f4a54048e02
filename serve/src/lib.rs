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
pub mod gc;
pub mod htpasswd;
pub mod metrics;
pub mod mirror;
mod push;
pub mod registry_storage;
pub mod s3_client;
pub mod s3_storage;
mod sha256_state;
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
    /// Where `/metrics` and `/healthz` answer (plain HTTP), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
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
            metrics_listen: None,
        }
    }
}

/// Serves `storage` until SIGTERM or SIGINT. `ready` is called with the
/// bound addresses (the registry's, and the metrics' when asked for) once
/// the sockets listen (port 0 picks a free port).
pub fn run(
    options: Options,
    backend: api::Backend,
    ready: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> Result<(), ServeError> {
    server::raise_file_limit();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = options.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.enable_all().build().map_err(ServeError::Runtime)?;
    rt.block_on(async move {
        let bind = |addr: SocketAddr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { addr, source })
        };
        let listener = bind(options.listen).await?;
        let metrics_listener = match options.metrics_listen {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let bound = listener.local_addr().map_err(ServeError::Runtime)?;
        let metrics_bound = match &metrics_listener {
            Some(l) => Some(l.local_addr().map_err(ServeError::Runtime)?),
            None => None,
        };
        ready(bound, metrics_bound);
        let backend = Arc::new(backend);
        let metrics = Arc::new(metrics::Metrics::new(&backend));
        if let Some(l) = metrics_listener {
            tokio::spawn(serve_metrics(l, options.clone(), backend.clone(), metrics.clone()));
        }
        serve(listener, options, backend, metrics).await;
        Ok(())
    })
}

/// `/metrics` and `/healthz`, on their own listener.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    options: Options,
    backend: Arc<api::Backend>,
    metrics: Arc<metrics::Metrics>,
) {
    let limits = server::Limits {
        header_timeout: options.header_timeout,
        max_connections: 256,
        drain_timeout: options.drain_timeout,
    };
    server::serve(
        listener,
        limits,
        "gantry serve: metrics and health stop answering",
        move |_, req| {
            let (backend, metrics) = (backend.clone(), metrics.clone());
            async move {
                let text = |status: u16, body: String, kind: &'static str| {
                    let mut r = hyper::Response::new(api::full(body));
                    *r.status_mut() = hyper::StatusCode::from_u16(status).expect("a status");
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(kind),
                    );
                    r
                };
                match (req.method().as_str(), req.uri().path()) {
                    ("GET", "/metrics") => text(
                        200,
                        metrics.render(&backend),
                        "text/plain; version=0.0.4; charset=utf-8",
                    ),
                    ("GET", "/healthz") => match backend.check().await {
                        Ok(()) => text(200, "ok\n".into(), "text/plain; charset=utf-8"),
                        Err(e) => text(
                            503,
                            format!("storage: {}\n", gantry_core::text::escape_line(&e.to_string())),
                            "text/plain; charset=utf-8",
                        ),
                    },
                    _ => text(404, "not found\n".into(), "text/plain; charset=utf-8"),
                }
            }
        },
    )
    .await;
}

async fn serve(
    listener: tokio::net::TcpListener,
    options: Options,
    backend: Arc<api::Backend>,
    metrics: Arc<metrics::Metrics>,
) {
    if let api::Backend::Registry { storage, .. } = &*backend {
        match storage {
            registry_storage::Registry::Fs(s) => sweep_uploads(s.clone()),
            registry_storage::Registry::S3(s) => sweep_uploads(s.clone()),
        }
    }
    let limits = server::Limits {
        header_timeout: options.header_timeout,
        max_connections: options.max_connections,
        drain_timeout: options.drain_timeout,
    };
    let stopping = "gantry serve: shutting down, letting requests in flight finish";
    server::serve_tls(listener, limits, stopping, options.tls.clone(), move |peer, req| {
        let (backend, metrics) = (backend.clone(), metrics.clone());
        async move {
            let started = Instant::now();
            let (method, target) = (req.method().clone(), req.uri().clone());
            let resp = api::handle(&backend, req).await;
            let sent = resp
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            metrics.observe(
                api::route_label(target.path()),
                &method,
                resp.status().as_u16(),
                started.elapsed(),
                if method == hyper::Method::HEAD { 0 } else { sent },
            );
            log(peer, &method, &target, &resp, started);
            resp
        }
    })
    .await;
}

/// Removes expired upload sessions, with their files, every quarter of the
/// expiry (at most a minute apart), so abandoned sessions go even when no
/// one starts another.
fn sweep_uploads<S: registry_storage::RegistryStorage>(storage: Arc<S>) {
    let every = (storage.upload_limits().expiry / 4).clamp(Duration::from_millis(250), Duration::from_secs(60));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            storage.sweep_uploads().await;
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
