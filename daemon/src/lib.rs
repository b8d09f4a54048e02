//! `gantry daemon`: Docker's Engine API image routes over a unix socket
//! (and TCP when asked), so the `docker` CLI and SDKs talk to gantry as to
//! dockerd.
//!
//! The routes ([`api`]) call an [`Engine`]: the binary implements it over
//! the same core pipelines the CLI uses, so the two faces cannot drift.
//! Engine calls are synchronous (the core is thread-based); each runs on a
//! blocking thread, and a pull's progress reaches the client as Docker's
//! JSON message stream through a channel.
//!
//! Like `gantry serve`, and on the same accept loop (`gantry-http`), it is
//! built for clients that misbehave: request heads are bounded and must
//! arrive in time, and one client's requests never block another's.

pub mod api;

use gantry_http::server;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use api::{Engine, EngineError};

/// The Engine API version this daemon speaks, and the oldest it accepts.
pub const API_VERSION: &str = "1.47";
pub const MIN_API_VERSION: &str = "1.24";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("--host {0}")]
    Host(String),
    #[error("{0}")]
    Setup(String),
    #[error("{path} is in use by a running daemon")]
    InUse { path: PathBuf },
    #[error("starting the daemon: {0}")]
    Runtime(std::io::Error),
}

/// Connections past this many are closed at once (the file limit is
/// raised so that many fit).
const MAX_CONNECTIONS: usize = 4096;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight may take to finish after a signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const STOPPING: &str = "gantry daemon: shutting down";

/// Where the daemon listens: a unix socket, or TCP when asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// The TCP port dockerd uses when an address names none.
const DEFAULT_TCP_PORT: u16 = 2375;

impl Listen {
    /// Docker's `-H` syntax: `unix:///path`, `tcp://host:port`, `tcp://:port`
    /// and `tcp://` (loopback, port 2375 when none is given). A host name
    /// must be an IP address: what is bound is what was asked.
    pub fn parse(s: &str) -> Result<Listen, DaemonError> {
        let bad = |why: &str| DaemonError::Host(format!("{}: {why}", s.escape_default()));
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(bad("give a socket path (unix:///run/gantry.sock)"));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        let Some(addr) = s.strip_prefix("tcp://") else {
            return Err(bad("give unix:///PATH or tcp://HOST:PORT"));
        };
        let addr = addr.trim_end_matches('/');
        let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| bad("an unclosed ["))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("expected :PORT after ]"))?),
                ),
            }
        } else if addr.matches(':').count() > 1 {
            return Err(bad("put an IPv6 address in brackets (tcp://[::1]:2375)"));
        } else {
            match addr.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (addr, None),
            }
        };
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad("the port is not a number"))?,
            None => DEFAULT_TCP_PORT,
        };
        let ip: IpAddr = if host.is_empty() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            host.parse().map_err(|_| bad("the host must be an IP address"))?
        };
        Ok(Listen::Tcp(SocketAddr::new(ip, port)))
    }

    /// Whether only this machine can reach it.
    pub fn is_local(&self) -> bool {
        match self {
            Listen::Unix(_) => true,
            Listen::Tcp(a) => a.ip().is_loopback(),
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix://{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// A bound listener.
enum Bound {
    Unix(PathBuf, tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// Serves each engine on its own listeners (one socket per tenant: nothing
/// but the process is shared — each engine has its own store, plugins and
/// limits) until SIGTERM or SIGINT. `ready` is called once every listener
/// listens, with their addresses (a TCP port 0 resolved); an error from it
/// (a socket's group could not be set) stops the daemon before it serves.
pub fn run_many(
    servers: Vec<(Vec<Listen>, Arc<dyn Engine>)>,
    ready: impl FnOnce(&[Listen]) -> Result<(), String>,
) -> Result<(), DaemonError> {
    for listen in servers.iter().flat_map(|(l, _)| l) {
        // A socket a previous daemon left is replaced; one a live daemon
        // answers on is not.
        if let Listen::Unix(path) = listen {
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(DaemonError::InUse { path: path.clone() });
                }
                let _ = std::fs::remove_file(path);
            }
        }
    }
    server::raise_file_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    // The engines are let go here, outside the runtime: one may own a
    // runtime of its own (an HTTP client), which must not be dropped from
    // async code.
    let keep: Vec<Arc<dyn Engine>> = servers.iter().map(|(_, e)| e.clone()).collect();
    let result = rt.block_on(async move {
        let mut bound = Vec::new();
        let mut addrs = Vec::new();
        for (listens, engine) in servers {
            for listen in listens {
                let b = match &listen {
                    Listen::Unix(path) => {
                        let l = tokio::net::UnixListener::bind(path).map_err(|source| DaemonError::Listen {
                            addr: listen.to_string(),
                            source,
                        })?;
                        // Owner and group only, as dockerd's socket.
                        use std::os::unix::fs::PermissionsExt;
                        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
                        addrs.push(listen.clone());
                        Bound::Unix(path.clone(), l)
                    }
                    Listen::Tcp(addr) => {
                        let l = tokio::net::TcpListener::bind(addr)
                            .await
                            .map_err(|source| DaemonError::Listen {
                                addr: listen.to_string(),
                                source,
                            })?;
                        addrs.push(Listen::Tcp(l.local_addr().unwrap_or(*addr)));
                        Bound::Tcp(l)
                    }
                };
                bound.push((b, engine.clone()));
            }
        }
        if let Err(m) = ready(&addrs) {
            for (b, _) in &bound {
                if let Bound::Unix(path, _) = b {
                    let _ = std::fs::remove_file(path);
                }
            }
            return Err(DaemonError::Setup(m));
        }
        let limits = server::Limits {
            header_timeout: HEADER_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            drain_timeout: DRAIN_TIMEOUT,
        };
        let mut tasks = Vec::new();
        for (b, engine) in bound {
            tasks.push(tokio::spawn(async move {
                match b {
                    Bound::Unix(path, l) => {
                        server::serve(l, limits, STOPPING, move |(), req| api::handle(engine.clone(), req)).await;
                        let _ = std::fs::remove_file(&path);
                    }
                    Bound::Tcp(l) => {
                        server::serve(l, limits, STOPPING, move |_, req| api::handle(engine.clone(), req)).await
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse_as_docker_s() {
        let tcp = |s: &str| Listen::Tcp(s.parse().unwrap());
        assert_eq!(
            Listen::parse("unix:///run/g.sock").unwrap(),
            Listen::Unix("/run/g.sock".into())
        );
        assert_eq!(Listen::parse("tcp://127.0.0.1:2376").unwrap(), tcp("127.0.0.1:2376"));
        assert_eq!(Listen::parse("tcp://:2380").unwrap(), tcp("127.0.0.1:2380"));
        assert_eq!(Listen::parse("tcp://").unwrap(), tcp("127.0.0.1:2375"));
        assert_eq!(Listen::parse("tcp://[::1]:9").unwrap(), tcp("[::1]:9"));
        assert_eq!(Listen::parse("tcp://0.0.0.0").unwrap(), tcp("0.0.0.0:2375"));
        assert!(!Listen::parse("tcp://0.0.0.0").unwrap().is_local());
        assert!(Listen::parse("tcp://:1").unwrap().is_local());
        for bad in [
            "unix://",
            "fd://",
            "tcp://localhost:1",
            "tcp://::1",
            "tcp://1.2.3.4:x",
            "tcp://[::1",
        ] {
            assert!(Listen::parse(bad).is_err(), "{bad}");
        }
    }
}
