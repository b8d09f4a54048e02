//! `gantry daemon`: Docker's Engine API image routes over a unix socket,
//! so the `docker` CLI and SDKs talk to gantry as to dockerd.
//!
//! The routes ([`api`]) call an [`Engine`]: the binary implements it over
//! the same core pipelines the CLI uses, so the two faces cannot drift.
//! Engine calls are synchronous (the core is thread-based); each runs on a
//! blocking thread, and a pull's progress reaches the client as Docker's
//! JSON message stream through a channel.
//!
//! Like `gantry serve`, it is built for clients that misbehave: request
//! heads are bounded and must arrive in time, and one client's requests
//! never block another's.

pub mod api;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use api::{Engine, EngineError};

/// The Engine API version this daemon speaks, and the oldest it accepts.
pub const API_VERSION: &str = "1.47";
pub const MIN_API_VERSION: &str = "1.24";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("{path} is in use by a running daemon")]
    InUse { path: PathBuf },
    #[error("starting the daemon: {0}")]
    Runtime(std::io::Error),
}

/// The largest request head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Connections past this many are closed at once (the file limit is
/// raised so that many fit).
const MAX_CONNECTIONS: usize = 4096;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `engine` on the unix socket `path` until SIGTERM or SIGINT.
/// `ready` is called once the socket listens.
pub fn run(path: &Path, engine: Arc<dyn Engine>, ready: impl FnOnce()) -> Result<(), DaemonError> {
    run_many(vec![(path.to_path_buf(), engine)], ready)
}

/// Serves each engine on its own socket (one per tenant: nothing but the
/// process is shared — each engine has its own store, plugins and limits)
/// until SIGTERM or SIGINT. `ready` is called once every socket listens.
pub fn run_many(servers: Vec<(PathBuf, Arc<dyn Engine>)>, ready: impl FnOnce()) -> Result<(), DaemonError> {
    for (path, _) in &servers {
        // A socket a previous daemon left is replaced; one a live daemon
        // answers on is not.
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(DaemonError::InUse { path: path.clone() });
            }
            let _ = std::fs::remove_file(path);
        }
    }
    gantry_serve::raise_file_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    // The engines are let go here, outside the runtime: one may own a
    // runtime of its own (an HTTP client), which must not be dropped from
    // async code.
    let keep: Vec<Arc<dyn Engine>> = servers.iter().map(|(_, e)| e.clone()).collect();
    let result = rt.block_on(async move {
        let mut listeners = Vec::new();
        for (path, engine) in servers {
            let listener = tokio::net::UnixListener::bind(&path).map_err(|source| DaemonError::Listen {
                path: path.clone(),
                source,
            })?;
            // Owner and group only, as dockerd's socket.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660));
            listeners.push((path, listener, engine));
        }
        ready();
        let mut tasks = Vec::new();
        for (path, listener, engine) in listeners {
            tasks.push(tokio::spawn(async move {
                serve(listener, engine).await;
                let _ = std::fs::remove_file(&path);
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    });
    drop(rt);
    drop(keep);
    result
}

async fn serve(listener: tokio::net::UnixListener, engine: Arc<dyn Engine>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let http = Arc::new(http);
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        use std::sync::atomic::Ordering;
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let engine = engine.clone();
        let service = service_fn(move |req| {
            let engine = engine.clone();
            async move { Ok::<_, std::convert::Infallible>(api::handle(engine, req).await) }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        let open = open.clone();
        tokio::spawn(async move {
            let _ = conn.await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    eprintln!("gantry daemon: shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}
