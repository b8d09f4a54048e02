//! Outgoing HTTP for transport plugins, filtered by the host.
//!
//! Every call of a transport has a [`CallScope`]: the endpoint the core
//! opened for it, plus the token realm that endpoint names in a
//! `WWW-Authenticate` challenge during that same call. Every hop is checked:
//! the method (a pull reads; `POST` only to its realm), the scheme (plain
//! HTTP only to loopback or registries marked insecure), and the address,
//! by the core's [`HopPolicy`]: the registry's own host may be anywhere; a
//! registry on a loopback or private address may send a hop within
//! internal networks; a host in its `redirect_hosts` may be anywhere;
//! every other hop reaches public addresses only (a name is resolved to
//! what the hop may reach), so a public registry's redirect or realm never
//! reaches an internal service. Redirects are
//! followed here, not in the guest; only reads may leave the origin, and
//! then without the `authorization` header. Headers that frame or route a
//! request (`Host`, `Transfer-Encoding`, hop-by-hop ones) are the host's.

use crate::plugin::bindings::WitError;
use bytes::Bytes;
use gantry_core::endpoint::{
    allows_plain_http, may_leave_origin, registry_config, HopPolicy, Reach, Registries, MAX_REDIRECTS,
};
use gantry_core::text::{escape_line, redact_url};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use std::future::Future;
use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Box<dyn Read + Send>,
}

/// A request body: empty, or a host-owned stream fed through a channel.
type ReqBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

type Client = hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector<Resolver>>, ReqBody>;

/// The clients and the registry settings shared by every call of a
/// transport. One HTTP stack with the server: hyper on tokio, rustls; the
/// synchronous host calls bridge to it on a runtime of their own, and
/// connections are kept and reused per origin.
pub struct HttpPolicy {
    rt: tokio::runtime::Runtime,
    /// For hops to the registry's own host, or a host it lists.
    any: Client,
    /// For hops an internal registry sends within internal networks.
    internal: Client,
    /// For every other hop: names resolve to public addresses only.
    public_only: Client,
    registries: Registries,
}

/// How long a connection may take to open, and a read to bring anything.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Methods a pull may use: reads, and `POST` for an OAuth2 token.
const PULL_METHODS: &[&str] = &["GET", "HEAD", "POST"];

/// Methods a push may use (to its endpoint; still only reads may leave
/// the origin on a redirect).
const PUSH_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];

/// Headers the host owns (with every `proxy-*` one): framing, connection
/// management and the target.
/// A guest setting one could smuggle a request or reach another virtual host.
const HOST_OWNED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "expect",
];

/// What one transport call may reach: the endpoint the core opened for it
/// and the token realms that endpoint named during this same call.
pub struct CallScope {
    endpoint: url::Url,
    realms: Vec<String>,
    methods: &'static [&'static str],
    /// Where this call's hops may connect (made on its first request).
    hops: Option<HopPolicy>,
}

impl CallScope {
    /// The scope of a pull call to the endpoint at `base_url`.
    pub fn pull(base_url: &str) -> CallScope {
        let endpoint = url::Url::parse(base_url).unwrap_or_else(|_| url::Url::parse("invalid://").expect("valid"));
        CallScope {
            endpoint,
            realms: Vec::new(),
            methods: PULL_METHODS,
            hops: None,
        }
    }

    /// The scope of a push call: it may write to its endpoint.
    pub fn push(base_url: &str) -> CallScope {
        CallScope {
            methods: PUSH_METHODS,
            ..CallScope::pull(base_url)
        }
    }

    fn writes(&self) -> bool {
        std::ptr::eq(self.methods, PUSH_METHODS)
    }

    fn endpoint_origin(&self) -> String {
        origin(&self.endpoint)
    }

    /// The call's hop policy: a pull's or a push's registry on an internal
    /// address may send hops within internal networks.
    fn hops(&mut self, registries: &Registries) -> &mut HopPolicy {
        let endpoint = &self.endpoint;
        self.hops.get_or_insert_with(|| {
            HopPolicy::new(
                endpoint.host_str().unwrap_or(""),
                registry_config(&domain_of(endpoint), registries),
                true,
            )
        })
    }
}

/// The clients' name resolver: the system's, keeping only the addresses
/// its client's hops may reach.
#[derive(Clone)]
struct Resolver {
    reach: Reach,
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let reach = self.reach;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs = tokio::task::spawn_blocking(move || resolve(&host, reach))
                .await
                .map_err(std::io::Error::other)??;
            Ok(addrs.into_iter())
        })
    }
}

/// Resolves `host` for a client, keeping only the addresses its hops may
/// reach, so a name cannot resolve a redirect or a realm onto an internal
/// service (the same rule as for a host written as an address).
fn resolve(host: &str, reach: Reach) -> std::io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, 0).to_socket_addrs()?.collect();
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

fn client(reach: Reach) -> Client {
    let mut http = HttpConnector::new_with_resolver(Resolver { reach });
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https)
}

/// A response body read synchronously: each read waits (at most
/// [`READ_TIMEOUT`]) for the next piece on the client's runtime.
struct BodyReader {
    rt: tokio::runtime::Handle,
    body: hyper::body::Incoming,
    buf: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if !self.buf.is_empty() {
                let n = out.len().min(self.buf.len());
                out[..n].copy_from_slice(&self.buf.split_to(n));
                return Ok(n);
            }
            let body = &mut self.body;
            let frame = self
                .rt
                .block_on(async { tokio::time::timeout(READ_TIMEOUT, body.frame()).await });
            match frame {
                Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the server sent nothing for 60 s",
                    ))
                }
                Ok(None) => return Ok(0),
                Ok(Some(Err(e))) => return Err(std::io::Error::other(e)),
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf = d;
                    }
                }
            }
        }
    }
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

/// `scheme://host:port` of a URL.
pub fn origin(u: &url::Url) -> String {
    format!(
        "{}://{}:{}",
        u.scheme(),
        u.host_str().unwrap_or(""),
        u.port_or_known_default().unwrap_or(0)
    )
}

fn domain_of(u: &url::Url) -> String {
    match u.port() {
        Some(p) => format!("{}:{p}", u.host_str().unwrap_or("")),
        None => u.host_str().unwrap_or("").to_string(),
    }
}

impl HttpPolicy {
    pub fn new(registries: Registries) -> HttpPolicy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gantry-http")
            .enable_all()
            .build()
            .expect("starting the HTTP client's runtime");
        let (any, internal, public_only) = {
            let _in_rt = rt.enter();
            (client(Reach::Any), client(Reach::Internal), client(Reach::Public))
        };
        HttpPolicy {
            rt,
            any,
            internal,
            public_only,
            registries,
        }
    }

    fn check_scheme(&self, u: &url::Url) -> Result<(), WitError> {
        match u.scheme() {
            "https" => Ok(()),
            "http" if allows_plain_http(&domain_of(u), &self.registries) => Ok(()),
            "http" => Err(WitError::Denied(format!(
                "plain HTTP to {} is not allowed (only loopback or registries marked insecure)",
                escape_line(&domain_of(u))
            ))),
            s => Err(WitError::Denied(format!(
                "URL scheme {} is not allowed",
                escape_line(s)
            ))),
        }
    }

    /// Checks one hop: its address by the call's hop policy, then its
    /// scheme. Returns what the hop may reach.
    fn check_hop(&self, scope: &mut CallScope, u: &url::Url) -> Result<Reach, WitError> {
        let port = u.port_or_known_default().unwrap_or(0);
        let reach = scope
            .hops(&self.registries)
            .check(u.host_str().unwrap_or(""), port)
            .map_err(|e| WitError::Denied(format!("{} {e}", redact_url(u.as_str()))))?;
        self.check_scheme(u)?;
        Ok(reach)
    }

    fn client(&self, reach: Reach) -> &Client {
        match reach {
            Reach::Any => &self.any,
            Reach::Internal => &self.internal,
            Reach::Public => &self.public_only,
        }
    }

    /// Sends a request for a plugin within the call's `scope`.
    pub fn send(
        &self,
        scope: &mut CallScope,
        method: &str,
        url: &str,
        headers: Vec<(String, String)>,
    ) -> Result<HttpResponse, WitError> {
        self.send_with(scope, method, url, headers, None)
    }

    /// Sends a request whose body is read from `body` (`length` bytes when
    /// known, else chunked), within a push `scope`. A request with a body
    /// is not replayed: a redirect is handed back as the answer.
    pub fn send_body(
        &self,
        scope: &mut CallScope,
        method: &str,
        url: &str,
        headers: Vec<(String, String)>,
        body: &mut (dyn Read + Send),
        length: Option<u64>,
    ) -> Result<HttpResponse, WitError> {
        self.send_with(scope, method, url, headers, Some((body, length)))
    }

    fn send_with(
        &self,
        scope: &mut CallScope,
        method: &str,
        url: &str,
        mut headers: Vec<(String, String)>,
        mut body: Option<(&mut (dyn Read + Send), Option<u64>)>,
    ) -> Result<HttpResponse, WitError> {
        let mut u = url::Url::parse(url).map_err(|e| WitError::Invalid(format!("bad URL {}: {e}", redact_url(url))))?;
        if !scope.methods.contains(&method) {
            return Err(WitError::Denied(format!(
                "HTTP method {} is not allowed in this call",
                escape_line(method)
            )));
        }
        for (k, v) in &headers {
            let lk = k.to_ascii_lowercase();
            if HOST_OWNED_HEADERS.contains(&lk.as_str()) || lk.starts_with("proxy-") {
                return Err(WitError::Denied(format!(
                    "the plugin may not set the {} header",
                    escape_line(k)
                )));
            }
            if k.bytes().chain(v.bytes()).any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(WitError::Invalid("a header holds a line break".into()));
            }
        }
        let here = origin(&u);
        let is_realm = scope.realms.contains(&here);
        if here != scope.endpoint_origin() && !is_realm {
            return Err(WitError::Denied(format!(
                "the plugin may not connect to {}",
                redact_url(&here)
            )));
        }
        if method == "POST" && !is_realm && !scope.writes() {
            return Err(WitError::Denied(
                "HTTP method POST is allowed only to the registry's token realm in a pull".into(),
            ));
        }
        let mut left_endpoint = false;
        for _ in 0..=MAX_REDIRECTS {
            let reach = self.check_hop(scope, &u)?;
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(u.as_str())
                .header("user-agent", concat!("gantry/", env!("CARGO_PKG_VERSION")));
            for (k, v) in &headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let streamed = body.take();
            if let Some((_, Some(len))) = &streamed {
                req = req.header("content-length", *len);
            }
            let (req_body, feed) = match streamed {
                None => (Empty::new().map_err(|never| match never {}).boxed(), None),
                Some((reader, _)) => {
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    (ChannelBody(rx).boxed(), Some((tx, reader)))
                }
            };
            let req = req
                .body(req_body)
                .map_err(|e| WitError::Invalid(format!("bad request: {}", escape_line(&e.to_string()))))?;
            let client = self.client(reach);
            let called = match feed {
                None => self.rt.block_on(async {
                    tokio::time::timeout(CONNECT_TIMEOUT + READ_TIMEOUT, client.request(req)).await
                }),
                Some((tx, reader)) => self.rt.block_on(feed_request(client.request(req), tx, reader)),
            };
            let resp = match called {
                Ok(Ok(r)) => r,
                Err(_) => {
                    return Err(WitError::Transient(format!(
                        "{}: no answer in time",
                        redact_url(&origin(&u))
                    )))
                }
                Ok(Err(e)) => {
                    // Built from the parts: the URL (and its query) is shown redacted.
                    let msg = format!("{}: {}", redact_url(&origin(&u)), escape_line(&chain(&e)));
                    return Err(if e.is_connect() {
                        WitError::Unreachable(msg)
                    } else {
                        WitError::Transient(msg)
                    });
                }
            };
            // Where the registry's own host really is decides what else it may name.
            let hops = scope.hops(&self.registries);
            if hops.is_registry_host(u.host_str().unwrap_or("")) {
                if let Some(info) = resp.extensions().get::<hyper_util::client::legacy::connect::HttpInfo>() {
                    hops.saw_registry_at(info.remote_addr().ip());
                }
            }
            let status = resp.status().as_u16();
            let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
            if (300..400).contains(&status) && status != 304 && !scope.writes() {
                if let Some(loc) = header("location") {
                    let next = u
                        .join(loc)
                        .map_err(|e| WitError::Invalid(format!("bad redirect {}: {e}", redact_url(loc))))?;
                    if origin(&next) != origin(&u) {
                        // Only reads may leave the origin, and never with the token.
                        if !may_leave_origin(method) {
                            return Err(WitError::Denied(format!(
                                "a {method} request was redirected to another origin ({})",
                                redact_url(next.as_str())
                            )));
                        }
                        headers.retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
                        left_endpoint = true;
                    }
                    u = next;
                    continue;
                }
            }
            if status == 401 && !left_endpoint && origin(&u) == scope.endpoint_origin() {
                // A realm counts only when the registry itself names it, and
                // only for this call.
                if let Some(realm) = header("www-authenticate").and_then(realm_of) {
                    if let Ok(r) = url::Url::parse(&realm) {
                        if self.check_hop(scope, &r).is_ok() && !scope.realms.contains(&origin(&r)) {
                            scope.realms.push(origin(&r));
                        }
                    }
                }
            }
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            return Ok(HttpResponse {
                status,
                headers,
                body: Box::new(BodyReader {
                    rt: self.rt.handle().clone(),
                    body: resp.into_body(),
                    buf: Bytes::new(),
                }),
            });
        }
        Err(WitError::Invalid(format!(
            "more than {MAX_REDIRECTS} redirects from {}",
            redact_url(url)
        )))
    }
}

/// A request body fed from a channel by [`feed_request`].
struct ChannelBody(tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|c| c.map(|r| r.map(hyper::body::Frame::data)))
    }
}

/// Sends a request while feeding its body from `reader` (read on this
/// thread, a piece at a time, as the connection takes them). The answer
/// may come before the body is done (a registry refusing early); the rest
/// is then not read.
async fn feed_request<F>(
    request: F,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    reader: &mut (dyn Read + Send),
) -> Result<
    Result<hyper::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
    tokio::time::error::Elapsed,
>
where
    F: Future<Output = Result<hyper::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>>,
{
    let mut request = std::pin::pin!(request);
    let mut done = false;
    while !done {
        tokio::select! {
            r = &mut request => return Ok(r),
            permit = tokio::time::timeout(READ_TIMEOUT, tx.reserve()) => match permit {
                // The connection took nothing for a minute.
                Err(elapsed) => return Err(elapsed),
                // The connection is gone: its error comes with the answer.
                Ok(Err(_)) => done = true,
                Ok(Ok(permit)) => {
                    let mut buf = vec![0u8; 256 << 10];
                    match reader.read(&mut buf) {
                        Ok(0) => done = true,
                        Ok(n) => {
                            buf.truncate(n);
                            permit.send(Ok(Bytes::from(buf)));
                        }
                        Err(e) => {
                            permit.send(Err(e));
                            done = true;
                        }
                    }
                }
            },
        }
    }
    drop(tx);
    tokio::time::timeout(CONNECT_TIMEOUT + READ_TIMEOUT, request).await
}

/// The `realm` of a `Bearer` challenge.
fn realm_of(challenge: &str) -> Option<String> {
    let (scheme, rest) = challenge.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let i = rest.find("realm=")?;
    let v = &rest[i + 6..];
    Some(match v.strip_prefix('"') {
        Some(q) => q.split('"').next()?.to_string(),
        None => v.split(',').next()?.trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_other_origins_methods_headers_and_plain_http() {
        let p = HttpPolicy::new(Registries::new());
        let mut scope = CallScope::pull("http://127.0.0.1:1");
        let e = p
            .send(&mut scope, "GET", "http://127.0.0.2:1/v2/", vec![])
            .err()
            .unwrap();
        assert!(matches!(e, WitError::Denied(_)), "{e:?}");
        let e = p
            .send(&mut scope, "DELETE", "http://127.0.0.1:1/v2/", vec![])
            .err()
            .unwrap();
        assert!(matches!(&e, WitError::Denied(m) if m.contains("DELETE")), "{e:?}");
        let e = p
            .send(&mut scope, "POST", "http://127.0.0.1:1/v2/", vec![])
            .err()
            .unwrap();
        assert!(matches!(&e, WitError::Denied(m) if m.contains("realm")), "{e:?}");
        for h in ["Host", "transfer-encoding", "Connection", "Proxy-Foo"] {
            let e = p
                .send(
                    &mut scope,
                    "GET",
                    "http://127.0.0.1:1/v2/",
                    vec![(h.into(), "x".into())],
                )
                .err()
                .unwrap();
            assert!(matches!(&e, WitError::Denied(m) if m.contains(h)), "{e:?}");
        }
        let mut scope = CallScope::pull("http://example.com");
        let e = p
            .send(&mut scope, "GET", "http://example.com/v2/", vec![])
            .err()
            .unwrap();
        assert!(matches!(e, WitError::Denied(m) if m.contains("plain HTTP")));
        assert_eq!(
            realm_of(r#"Bearer realm="http://a:1/t",service="x""#).as_deref(),
            Some("http://a:1/t")
        );
    }

    #[test]
    fn hops_follow_the_cores_policy() {
        let mut scope = CallScope::pull("https://registry.example");
        let p = HttpPolicy::new(Registries::new());
        for u in [
            "https://127.0.0.1:2375/",
            "https://localhost/",
            "https://[::1]/",
            "http://169.254.169.254/",
        ] {
            let e = p.check_hop(&mut scope, &url::Url::parse(u).unwrap()).unwrap_err();
            assert!(
                matches!(&e, WitError::Denied(m) if m.contains("is an internal address")),
                "{u}: {e:?}"
            );
        }
        assert_eq!(
            p.check_hop(&mut scope, &url::Url::parse("https://cdn.example/x").unwrap())
                .ok(),
            Some(Reach::Public)
        );
        let mut local = CallScope::pull("http://127.0.0.1:5000");
        assert_eq!(
            p.check_hop(&mut local, &url::Url::parse("http://127.0.0.1:9000/x").unwrap())
                .ok(),
            Some(Reach::Any)
        );
        assert_eq!(
            p.check_hop(&mut local, &url::Url::parse("http://127.0.0.2:9000/x").unwrap())
                .ok(),
            Some(Reach::Internal)
        );
        assert!(p
            .check_hop(&mut local, &url::Url::parse("http://169.254.169.254/x").unwrap())
            .is_err());
        // A listed host: the registry's table in the config.
        let mut regs = Registries::new();
        regs.insert(
            "registry.example".into(),
            gantry_core::endpoint::RegistryConfig {
                redirect_hosts: vec!["10.0.0.9:9000".into()],
                ..Default::default()
            },
        );
        let p = HttpPolicy::new(regs);
        let mut scope = CallScope::pull("https://registry.example");
        assert_eq!(
            p.check_hop(&mut scope, &url::Url::parse("https://10.0.0.9:9000/x").unwrap())
                .ok(),
            Some(Reach::Any)
        );
        assert!(p
            .check_hop(&mut scope, &url::Url::parse("https://10.0.0.8:9000/x").unwrap())
            .is_err());
    }

    #[test]
    fn the_public_only_resolver_drops_internal_addresses() {
        let e = resolve("localhost", Reach::Public).unwrap_err();
        assert!(e.to_string().contains("not a public address"), "{e}");
        assert!(!resolve("localhost", Reach::Internal).unwrap().is_empty());
        assert!(!resolve("localhost", Reach::Any).unwrap().is_empty());
    }
}
