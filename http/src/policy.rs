//! Outgoing HTTP for transport plugins, filtered for the host.
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
//!
//! The calls are synchronous (the plugin host's are); they bridge to the
//! shared async [`crate::client`] on a runtime of their own.

use crate::body::{ChannelBody, Chunk};
use crate::client::{self, origin, Outbound, ReqBody, Response};
use crate::network::Network;
use bytes::Bytes;
use gantry_core::endpoint::{registry_config, HopPolicy, Reach, Registries, MAX_REDIRECTS};
use gantry_core::text::{escape_line, redact_url};
use http_body_util::BodyExt;
use std::future::Future;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

/// Why a request was not sent or not answered; the host hands each kind
/// to its guest as the matching error.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The call's scope does not allow it.
    #[error("{0}")]
    Denied(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// No answer, or a broken one: worth another try.
    #[error("{0}")]
    Transient(String),
    /// The server could not be connected to.
    #[error("{0}")]
    Unreachable(String),
}

impl From<client::HopError> for PolicyError {
    fn from(e: client::HopError) -> Self {
        PolicyError::Denied(e.to_string())
    }
}

impl From<client::RedirectError> for PolicyError {
    fn from(e: client::RedirectError) -> Self {
        match e {
            client::RedirectError::Bad { .. } => PolicyError::Invalid(e.to_string()),
            client::RedirectError::CrossOrigin { .. } => PolicyError::Denied(e.to_string()),
        }
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Box<dyn Read + Send>,
}

/// The clients and the registry settings shared by every call of a
/// transport. One HTTP stack with the servers: hyper on tokio, rustls; the
/// synchronous calls bridge to it on a runtime of their own, and
/// connections are kept and reused per origin.
pub struct HttpPolicy {
    rt: tokio::runtime::Runtime,
    clients: Outbound,
    registries: Registries,
}

/// How long a connection may take to open, and a read to bring anything.
const CONNECT_TIMEOUT: Duration = client::CONNECT_TIMEOUT;
const READ_TIMEOUT: Duration = Duration::from_secs(60);

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

/// What a call may do to its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads, and `POST` for an OAuth2 token (to the realm only).
    Pull,
    /// Writes too (still only reads may leave the origin on a redirect).
    Push,
}

impl Access {
    /// The methods a call of this access may use.
    fn methods(self) -> &'static [&'static str] {
        match self {
            Access::Pull => &["GET", "HEAD", "POST"],
            Access::Push => &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        }
    }
}

/// What one transport call may reach: the endpoint the core opened for it
/// and the token realms that endpoint named during this same call.
pub struct CallScope {
    endpoint: url::Url,
    realms: Vec<String>,
    access: Access,
    /// Where this call's hops may connect (made on its first request).
    hops: Option<HopPolicy>,
}

impl CallScope {
    /// The scope of a pull call to the endpoint at `base_url`.
    pub fn pull(base_url: &str) -> CallScope {
        CallScope::new(base_url, Access::Pull)
    }

    /// The scope of a push call: it may write to its endpoint.
    pub fn push(base_url: &str) -> CallScope {
        CallScope::new(base_url, Access::Push)
    }

    fn new(base_url: &str, access: Access) -> CallScope {
        let endpoint = url::Url::parse(base_url).unwrap_or_else(|_| url::Url::parse("invalid://").expect("valid"));
        CallScope {
            endpoint,
            realms: Vec::new(),
            access,
            hops: None,
        }
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
                registry_config(&client::domain_of(endpoint), registries),
                true,
            )
        })
    }

    /// Checks what a request asks before any hop: its method, its headers,
    /// and that it goes to the endpoint or a realm it named.
    fn check_request(&self, method: &str, headers: &[(String, String)], u: &url::Url) -> Result<(), PolicyError> {
        if !self.access.methods().contains(&method) {
            return Err(PolicyError::Denied(format!(
                "HTTP method {} is not allowed in this call",
                escape_line(method)
            )));
        }
        check_headers(headers)?;
        let here = origin(u);
        let is_realm = self.realms.contains(&here);
        if here != self.endpoint_origin() && !is_realm {
            return Err(PolicyError::Denied(format!(
                "the plugin may not connect to {}",
                redact_url(&here)
            )));
        }
        if method == "POST" && !is_realm && self.access == Access::Pull {
            return Err(PolicyError::Denied(
                "HTTP method POST is allowed only to the registry's token realm in a pull".into(),
            ));
        }
        Ok(())
    }
}

/// Refuses a header the host owns, and any line break or NUL.
fn check_headers(headers: &[(String, String)]) -> Result<(), PolicyError> {
    for (k, v) in headers {
        let lk = k.to_ascii_lowercase();
        if HOST_OWNED_HEADERS.contains(&lk.as_str()) || lk.starts_with("proxy-") {
            return Err(PolicyError::Denied(format!(
                "the plugin may not set the {} header",
                escape_line(k)
            )));
        }
        if k.bytes().chain(v.bytes()).any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(PolicyError::Invalid("a header holds a line break".into()));
        }
    }
    Ok(())
}

/// A request body still to be sent: a reader and its length, if known.
type Streamed<'a> = (&'a mut (dyn Read + Send), Option<u64>);

impl HttpPolicy {
    /// The policy of a transport reaching `registries` over `network`.
    pub fn new(registries: Registries, network: Arc<Network>) -> HttpPolicy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gantry-http")
            .enable_all()
            .build()
            .expect("starting the HTTP client's runtime");
        let clients = {
            let _in_rt = rt.enter();
            Outbound::new(network)
        };
        HttpPolicy {
            rt,
            clients,
            registries,
        }
    }

    /// Checks one hop: its address by the call's hop policy, then its
    /// scheme. Returns what the hop may reach.
    fn check_hop(&self, scope: &mut CallScope, u: &url::Url) -> Result<Reach, PolicyError> {
        let plain_ok = client::plain_http_allowed(u, &self.registries);
        Ok(client::check_hop(scope.hops(&self.registries), u, plain_ok)?)
    }

    /// Sends a request for a plugin within the call's `scope`.
    pub fn send(
        &self,
        scope: &mut CallScope,
        method: &str,
        url: &str,
        headers: Vec<(String, String)>,
    ) -> Result<HttpResponse, PolicyError> {
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
    ) -> Result<HttpResponse, PolicyError> {
        self.send_with(scope, method, url, headers, Some((body, length)))
    }

    /// Checks the request, then sends it hop by hop: a pull follows
    /// redirects (leaving the origin without the token); a 401 from the
    /// endpoint teaches the scope its realm.
    fn send_with(
        &self,
        scope: &mut CallScope,
        method: &str,
        url: &str,
        mut headers: Vec<(String, String)>,
        mut body: Option<Streamed<'_>>,
    ) -> Result<HttpResponse, PolicyError> {
        let mut u =
            url::Url::parse(url).map_err(|e| PolicyError::Invalid(format!("bad URL {}: {e}", redact_url(url))))?;
        scope.check_request(method, &headers, &u)?;
        let mut left_endpoint = false;
        for _ in 0..=MAX_REDIRECTS {
            let reach = self.check_hop(scope, &u)?;
            let resp = self.send_once(reach, method, &u, &headers, body.take())?;
            client::learn_registry_address(scope.hops(&self.registries), &u, &resp);
            if scope.access == Access::Pull {
                if let Some(next) = client::redirect(&u, method, &resp)? {
                    if next.leaves_origin {
                        headers.retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
                        left_endpoint = true;
                    }
                    u = next.to;
                    continue;
                }
            }
            if resp.status() == hyper::StatusCode::UNAUTHORIZED && !left_endpoint {
                self.learn_realm(scope, &u, &resp);
            }
            return Ok(self.response(resp));
        }
        Err(PolicyError::Invalid(format!(
            "more than {MAX_REDIRECTS} redirects from {}",
            redact_url(url)
        )))
    }

    /// Keeps the realm a 401 from the endpoint itself names, for this call
    /// only, when it is a hop the call may make.
    fn learn_realm(&self, scope: &mut CallScope, u: &url::Url, resp: &Response) {
        if origin(u) != scope.endpoint_origin() {
            return;
        }
        let challenge = resp
            .headers()
            .get(hyper::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok());
        let Some(realm) = challenge.and_then(client::realm_of) else {
            return;
        };
        if let Ok(r) = url::Url::parse(&realm) {
            if self.check_hop(scope, &r).is_ok() && !scope.realms.contains(&origin(&r)) {
                scope.realms.push(origin(&r));
            }
        }
    }

    /// Sends one hop's request and waits for its answer (feeding the body,
    /// if any, as the connection takes it).
    fn send_once(
        &self,
        reach: Reach,
        method: &str,
        u: &url::Url,
        headers: &[(String, String)],
        streamed: Option<Streamed<'_>>,
    ) -> Result<Response, PolicyError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(u.as_str())
            .header("user-agent", concat!("gantry/", env!("CARGO_PKG_VERSION")));
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some((_, Some(len))) = &streamed {
            req = req.header("content-length", *len);
        }
        let (req_body, feed): (ReqBody, _) = match streamed {
            None => (client::empty(), None),
            Some((reader, _)) => {
                let (tx, body) = ChannelBody::channel(4);
                (body.boxed(), Some((tx, reader)))
            }
        };
        let req = req
            .body(req_body)
            .map_err(|e| PolicyError::Invalid(format!("bad request: {}", escape_line(&e.to_string()))))?;
        let called = match feed {
            None => self.rt.block_on(async {
                tokio::time::timeout(CONNECT_TIMEOUT + READ_TIMEOUT, self.clients.request(reach, req)).await
            }),
            Some((tx, reader)) => self
                .rt
                .block_on(feed_request(self.clients.request(reach, req), tx, reader)),
        };
        match called {
            Ok(Ok(r)) => Ok(r),
            Err(_) => Err(PolicyError::Transient(format!(
                "{}: no answer in time",
                redact_url(&origin(u))
            ))),
            Ok(Err(e)) => {
                // Built from the parts: the URL (and its query) is shown redacted.
                let msg = format!("{}: {}", redact_url(&origin(u)), escape_line(&client::chain(&e)));
                Err(if e.is_connect() {
                    PolicyError::Unreachable(msg)
                } else {
                    PolicyError::Transient(msg)
                })
            }
        }
    }

    /// The answer as the guest gets it: status, headers, a body read on
    /// this policy's runtime.
    fn response(&self, resp: Response) -> HttpResponse {
        let status = resp.status().as_u16();
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
        HttpResponse {
            status,
            headers,
            body: Box::new(BodyReader {
                rt: self.rt.handle().clone(),
                body: resp.into_body(),
                buf: Bytes::new(),
            }),
        }
    }
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

/// Sends a request while feeding its body from `reader` (read on this
/// thread, a piece at a time, as the connection takes them). The answer
/// may come before the body is done (a registry refusing early); the rest
/// is then not read.
async fn feed_request<F>(
    request: F,
    tx: tokio::sync::mpsc::Sender<Chunk>,
    reader: &mut (dyn Read + Send),
) -> Result<Result<Response, hyper_util::client::legacy::Error>, tokio::time::error::Elapsed>
where
    F: Future<Output = Result<Response, hyper_util::client::legacy::Error>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_other_origins_methods_headers_and_plain_http() {
        let p = HttpPolicy::new(Registries::new(), Arc::new(Network::from_env()));
        let mut scope = CallScope::pull("http://127.0.0.1:1");
        let e = p
            .send(&mut scope, "GET", "http://127.0.0.2:1/v2/", vec![])
            .err()
            .unwrap();
        assert!(matches!(e, PolicyError::Denied(_)), "{e:?}");
        let e = p
            .send(&mut scope, "DELETE", "http://127.0.0.1:1/v2/", vec![])
            .err()
            .unwrap();
        assert!(matches!(&e, PolicyError::Denied(m) if m.contains("DELETE")), "{e:?}");
        let e = p
            .send(&mut scope, "POST", "http://127.0.0.1:1/v2/", vec![])
            .err()
            .unwrap();
        assert!(matches!(&e, PolicyError::Denied(m) if m.contains("realm")), "{e:?}");
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
            assert!(matches!(&e, PolicyError::Denied(m) if m.contains(h)), "{e:?}");
        }
        let mut scope = CallScope::pull("http://example.com");
        let e = p
            .send(&mut scope, "GET", "http://example.com/v2/", vec![])
            .err()
            .unwrap();
        assert!(matches!(e, PolicyError::Denied(m) if m.contains("plain HTTP")));
    }

    #[test]
    fn a_push_may_write_and_a_pull_may_not() {
        assert!(Access::Push.methods().contains(&"PUT"));
        assert!(!Access::Pull.methods().contains(&"PUT"));
        let scope = CallScope::push("http://127.0.0.1:1");
        assert!(scope
            .check_request("POST", &[], &url::Url::parse("http://127.0.0.1:1/v2/").unwrap())
            .is_ok());
        assert!(scope
            .check_request("DELETE", &[], &url::Url::parse("http://127.0.0.1:1/v2/").unwrap())
            .is_ok());
    }

    #[test]
    fn hops_follow_the_cores_policy() {
        let mut scope = CallScope::pull("https://registry.example");
        let p = HttpPolicy::new(Registries::new(), Arc::new(Network::from_env()));
        for u in [
            "https://127.0.0.1:2375/",
            "https://localhost/",
            "https://[::1]/",
            "http://169.254.169.254/",
        ] {
            let e = p.check_hop(&mut scope, &url::Url::parse(u).unwrap()).unwrap_err();
            assert!(
                matches!(&e, PolicyError::Denied(m) if m.contains("is an internal address")),
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
        let p = HttpPolicy::new(regs, Arc::new(Network::from_env()));
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
}
