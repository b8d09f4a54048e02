//! The connector of every outbound client: how one connection to a
//! registry, a redirect's target or a token realm is opened.
//!
//! In order:
//! 1. the proxy, if [`crate::proxy`] says the target takes one;
//! 2. the TCP connection: directly to an address the hop may reach (the
//!    [`Resolver`] drops the others), or to the proxy — a proxy is not a
//!    hop, so its own address is not checked, but the target still is:
//!    a hop that may reach only some networks is resolved here and the
//!    proxy is asked for the address that passed (`CONNECT 203.0.113.5:443`),
//!    while the registry's own host, which may be anywhere, is asked for by
//!    name (the proxy may be the only one that can resolve it);
//! 3. TLS for `https`, with the registry's config from [`crate::trust`].
//!
//! Plain HTTP through a proxy is sent in absolute form on the proxy's
//! connection ([`crate::client::Outbound::request`] adds its credentials),
//! HTTPS through a `CONNECT` tunnel, as Go's client does. The `CONNECT`
//! exchange is written here, not taken from `hyper-util`'s tunnel, so that
//! a refusal says what the proxy answered (`407 Proxy Authentication
//! Required`) without its credentials.

use crate::network::Network;
use crate::proxy::ProxyUrl;
use gantry_core::endpoint::{Reach, TLS_FAILURE};
use gantry_core::text::escape_line;
use hyper::Uri;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// How long a connection (and, apart, its TLS handshake or tunnel) may
/// take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The most a proxy's answer to `CONNECT` may hold before its end.
const MAX_PROXY_ANSWER: usize = 16 << 10;

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL names no host.
    #[error("the URL names no host")]
    NoHost,
    /// The name resolved to nothing this hop may reach (or to nothing).
    #[error("{0}")]
    Resolve(std::io::Error),
    /// The TCP connection to the target or the proxy failed.
    #[error("{0}")]
    Tcp(String),
    /// TLS failed: a certificate the trust settings refuse, most often.
    #[error("{TLS_FAILURE} with {host}: {source}")]
    Tls { host: String, source: std::io::Error },
    /// The proxy could not be used, or refused the tunnel.
    #[error("{proxy}: {reason}")]
    Proxy { proxy: String, reason: String },
    #[error("{0}")]
    Trust(#[from] crate::trust::TrustError),
}

/// Where a connection really goes, for hops that learn from it: set only
/// for a direct connection (through a proxy the target's address is the
/// proxy's business).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
}

/// The connector of the clients of one reach.
#[derive(Clone)]
pub struct Connector {
    reach: Reach,
    network: Arc<Network>,
    direct: HttpConnector<Resolver>,
    to_proxy: HttpConnector<GaiResolver>,
}

impl Connector {
    pub fn new(reach: Reach, network: Arc<Network>) -> Connector {
        let mut direct = HttpConnector::new_with_resolver(Resolver {
            reach,
            network: network.clone(),
        });
        let mut to_proxy = HttpConnector::new();
        direct.setup();
        to_proxy.setup();
        Connector {
            reach,
            network,
            direct,
            to_proxy,
        }
    }

    async fn connect(mut self, dst: Uri) -> Result<Conn, ConnectError> {
        let tls = dst.scheme_str() == Some("https");
        let host = dst
            .host()
            .ok_or(ConnectError::NoHost)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = dst.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let proxy = self
            .network
            .proxies
            .for_target(tls, &host, port)
            .map_err(|reason| ConnectError::Proxy {
                proxy: "proxy".into(),
                reason,
            })?
            .cloned();
        let (tcp, peer) = match &proxy {
            None => {
                let io = tcp_connect(&mut self.direct, &authority(&host, port)).await?;
                let addr = io.peer_addr().ok();
                (io, addr.map(|addr| Peer { addr }))
            }
            Some(p) if tls => {
                let target = self.tunnel_target(&host, port).await?;
                (self.tunnel(p, &target).await?, None)
            }
            Some(p) => {
                self.tunnel_target(&host, port).await?;
                (self.proxy_tcp(p).await?, None)
            }
        };
        let stream = if tls {
            Stream::Tls(Box::new(self.handshake(tcp, &host, port).await?))
        } else {
            Stream::Tcp(tcp)
        };
        Ok(Conn {
            io: TokioIo::new(stream),
            peer,
            absolute_form: proxy.is_some() && !tls,
        })
    }

    /// What to ask a proxy for: the host by name when this hop may reach
    /// any network, else the first address of it this hop may reach.
    async fn tunnel_target(&self, host: &str, port: u16) -> Result<String, ConnectError> {
        if self.reach == Reach::Any {
            return Ok(authority(host, port));
        }
        let (host, reach, network) = (host.to_string(), self.reach, self.network.clone());
        let addrs = tokio::task::spawn_blocking(move || resolve(&host, reach, &network))
            .await
            .map_err(|e| ConnectError::Resolve(std::io::Error::other(e)))?
            .map_err(ConnectError::Resolve)?;
        Ok(authority(&addrs[0].ip().to_string(), port))
    }

    async fn proxy_tcp(&mut self, proxy: &ProxyUrl) -> Result<TcpStream, ConnectError> {
        tcp_connect(&mut self.to_proxy, &authority(&proxy.host, proxy.port))
            .await
            .map_err(|e| ConnectError::Proxy {
                proxy: proxy.shown(),
                reason: e.to_string(),
            })
    }

    /// A `CONNECT` tunnel through `proxy` to `target` (`host:port`).
    async fn tunnel(&mut self, proxy: &ProxyUrl, target: &str) -> Result<TcpStream, ConnectError> {
        let mut tcp = self.proxy_tcp(proxy).await?;
        let refused = |reason: String| ConnectError::Proxy {
            proxy: proxy.shown(),
            reason,
        };
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(a) = &proxy.authorization {
            head.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
        head.push_str("\r\n");
        let exchange = async {
            tcp.write_all(head.as_bytes()).await?;
            read_head(&mut tcp).await
        };
        let answer = tokio::time::timeout(CONNECT_TIMEOUT, exchange)
            .await
            .map_err(|_| refused(format!("no answer to CONNECT {} in time", escape_line(target))))?
            .map_err(|e| refused(format!("CONNECT {}: {e}", escape_line(target))))?;
        let status_line = answer.lines().next().unwrap_or("");
        let status = status_line.split_whitespace().nth(1).unwrap_or("");
        if !status.starts_with('2') {
            return Err(refused(format!(
                "refused CONNECT {}: {}",
                escape_line(target),
                escape_line(status_line.split_once(' ').map(|(_, s)| s).unwrap_or(status_line))
            )));
        }
        Ok(tcp)
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        host: &str,
        port: u16,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
        let domain = if port == 443 {
            host.to_string()
        } else {
            authority(host, port)
        };
        let config = self.network.trust.config_for(&domain)?;
        let tls_err = |source: std::io::Error| ConnectError::Tls {
            host: escape_line(&domain),
            source,
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| tls_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let connecting = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                tls_err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no handshake in time",
                ))
            })?
            .map_err(tls_err)
    }
}

/// The connectors' shared TCP settings.
trait Tcp {
    fn setup(&mut self);
}

impl<R> Tcp for HttpConnector<R> {
    fn setup(&mut self) {
        self.enforce_http(false);
        self.set_connect_timeout(Some(CONNECT_TIMEOUT));
        self.set_nodelay(true);
    }
}

/// `host:port`, an IPv6 host in brackets.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A TCP connection by `http`'s resolver to `authority`.
async fn tcp_connect<R>(http: &mut HttpConnector<R>, authority: &str) -> Result<TcpStream, ConnectError>
where
    HttpConnector<R>: tower_service::Service<Uri, Response = TokioIo<TcpStream>>,
    <HttpConnector<R> as tower_service::Service<Uri>>::Error: std::error::Error,
{
    use tower_service::Service;
    let uri: Uri = format!("http://{authority}")
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| ConnectError::Tcp(e.to_string()))?;
    std::future::poll_fn(|cx| http.poll_ready(cx))
        .await
        .map_err(|e| ConnectError::Tcp(crate::client::chain(&e)))?;
    let io = http
        .call(uri)
        .await
        .map_err(|e| ConnectError::Tcp(crate::client::chain(&e)))?;
    Ok(io.into_inner())
}

/// Reads an HTTP answer's head, byte by byte so nothing of what follows
/// it (the tunnel's first bytes) is taken.
async fn read_head(tcp: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_ANSWER {
            return Err(std::io::Error::other("the answer's head is too long"));
        }
        if tcp.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the proxy closed the connection",
            ));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        Box::pin(self.clone().connect(dst))
    }
}

/// The clients' name resolver: the config's `[network.hosts]`, else the
/// system's, keeping only the addresses its client's hops may reach.
#[derive(Clone)]
pub struct Resolver {
    reach: Reach,
    network: Arc<Network>,
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let (reach, network) = (self.reach, self.network.clone());
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs = tokio::task::spawn_blocking(move || resolve(&host, reach, &network))
                .await
                .map_err(std::io::Error::other)??;
            Ok(addrs.into_iter())
        })
    }
}

/// Resolves `host`, keeping only the addresses `reach` admits.
pub(crate) fn resolve(host: &str, reach: Reach, network: &Network) -> std::io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = match network.host_override(host) {
        Some(ip) => vec![SocketAddr::new(ip, 0)],
        None => (host, 0).to_socket_addrs()?.collect(),
    };
    let kept: Vec<SocketAddr> = addrs.into_iter().filter(|a| reach.admits(a.ip())).collect();
    if kept.is_empty() {
        let what = match reach {
            Reach::Public => "a public address",
            _ => "an address this hop may reach",
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} is not {what}", escape_line(host)),
        ));
    }
    Ok(kept)
}

/// One connection, plain or TLS.
enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A connection as the client holds it.
pub struct Conn {
    io: TokioIo<Stream>,
    peer: Option<Peer>,
    /// Plain HTTP on a proxy's connection: requests go in absolute form.
    absolute_form: bool,
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let c = Connected::new().proxy(self.absolute_form);
        match self.peer {
            Some(p) => c.extra(p),
            None => c,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        hyper::rt::Write::is_write_vectored(&self.io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::NetworkConfig;
    use std::io::{Read, Write};

    /// A proxy that records the head of the one request it takes and
    /// refuses it.
    fn refusing_proxy() -> (u16, std::thread::JoinHandle<String>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap() == 1 {
                head.push(b[0]);
            }
            c.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").unwrap();
            String::from_utf8(head).unwrap()
        });
        (port, seen)
    }

    fn connect(reach: Reach, proxy_port: u16, url: &str) -> Result<Conn, ConnectError> {
        let mut c = NetworkConfig {
            https_proxy: Some(format!("http://user:pw@127.0.0.1:{proxy_port}")),
            no_proxy: Some(String::new()),
            ..Default::default()
        };
        c.hosts.insert("cdn.test".into(), "10.1.2.3".parse().unwrap());
        let network = Arc::new(Network::new(&c, &Default::default()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(Connector::new(reach, network).connect(url.parse().unwrap()))
    }

    #[test]
    fn a_hop_the_policy_judges_asks_the_proxy_for_the_address_that_passed() {
        let (port, seen) = refusing_proxy();
        let e = connect(Reach::Internal, port, "https://cdn.test:8443/blob")
            .err()
            .unwrap();
        let head = seen.join().unwrap();
        assert!(head.starts_with("CONNECT 10.1.2.3:8443 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("Proxy-Authorization: Basic dXNlcjpwdw==\r\n"), "{head}");
        let e = e.to_string();
        assert!(e.contains("refused CONNECT 10.1.2.3:8443: 403 Forbidden"), "{e}");
        assert!(!e.contains("pw"), "{e}");
    }

    #[test]
    fn the_registry_s_own_host_is_asked_for_by_name() {
        let (port, seen) = refusing_proxy();
        let _ = connect(Reach::Any, port, "https://cdn.test/v2/").err().unwrap();
        let head = seen.join().unwrap();
        assert!(head.starts_with("CONNECT cdn.test:443 HTTP/1.1\r\n"), "{head}");
    }

    #[test]
    fn a_public_hop_to_an_internal_name_never_reaches_the_proxy() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let e = connect(Reach::Public, port, "https://cdn.test/blob").err().unwrap();
        assert!(e.to_string().contains("cdn.test is not a public address"), "{e}");
        assert!(l.accept().is_err(), "the proxy was contacted");
    }

    #[test]
    fn the_public_only_resolver_drops_internal_addresses_even_from_the_config() {
        let n = Network::from_env();
        let e = resolve("localhost", Reach::Public, &n).unwrap_err();
        assert!(e.to_string().contains("not a public address"), "{e}");
        assert!(!resolve("localhost", Reach::Internal, &n).unwrap().is_empty());
        assert!(!resolve("localhost", Reach::Any, &n).unwrap().is_empty());
        let mut c = crate::network::NetworkConfig::default();
        c.hosts.insert("Public.Example".into(), "10.1.2.3".parse().unwrap());
        let n = Network::new(&c, &Default::default());
        assert!(resolve("public.example", Reach::Public, &n).is_err());
        assert_eq!(
            resolve("public.example", Reach::Internal, &n).unwrap()[0]
                .ip()
                .to_string(),
            "10.1.2.3"
        );
    }
}
