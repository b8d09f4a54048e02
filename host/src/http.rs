//! Outgoing HTTP for transport plugins, filtered by the host.
//!
//! Every call of a transport has a [`CallScope`]: the endpoint the core
//! opened for it, plus the token realm that endpoint names in a
//! `WWW-Authenticate` challenge during that same call. Every hop is checked:
//! the method (a pull reads; `POST` only to its realm), the scheme (plain
//! HTTP only to loopback or registries marked insecure), and the address —
//! only the registry's own host may be a loopback or private one, and a
//! name is resolved to public addresses only for any other host, so neither
//! a redirect nor a realm can reach an internal service. Redirects are
//! followed here, not in the guest; only reads may leave the origin, and
//! then without the `authorization` header. Headers that frame or route a
//! request (`Host`, `Transfer-Encoding`, hop-by-hop ones) are the host's.

use crate::plugin::bindings::WitError;
use gantry_core::endpoint::{allows_plain_http, Registries};
use gantry_core::text::{escape_line, redact_url};
use std::io::Read;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Box<dyn Read + Send>,
}

/// The client and the registry settings shared by every call of a transport.
pub struct HttpPolicy {
    agent: ureq::Agent,
    registries: Registries,
}

const MAX_REDIRECTS: usize = 10;

/// Methods a pull may use: reads, and `POST` for an OAuth2 token.
const PULL_METHODS: &[&str] = &["GET", "HEAD", "POST"];

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
}

impl CallScope {
    /// The scope of a pull call to the endpoint at `base_url`.
    pub fn pull(base_url: &str) -> CallScope {
        let endpoint = url::Url::parse(base_url).unwrap_or_else(|_| url::Url::parse("invalid://").expect("valid"));
        CallScope {
            endpoint,
            realms: Vec::new(),
            methods: PULL_METHODS,
        }
    }

    fn endpoint_origin(&self) -> String {
        origin(&self.endpoint)
    }

    /// Whether `u` is on the endpoint's own host (any port): the registry
    /// vouches for its own machine, not for others on its network.
    fn same_host(&self, u: &url::Url) -> bool {
        u.host_str().is_some() && u.host_str() == self.endpoint.host_str()
    }
}

thread_local! {
    /// Whether the connection being made may only reach public addresses.
    static PUBLIC_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether `ip` is an address on the public internet (not loopback,
/// private, link-local, shared, documentation or otherwise special).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_documentation()
                || a.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

/// Resolves names for the client, keeping only public addresses while the
/// hop being made is not to the registry's own host, so a name cannot
/// resolve a redirect or a realm onto an internal service.
fn resolve(netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
    if !PUBLIC_ONLY.get() {
        return Ok(addrs);
    }
    let public: Vec<SocketAddr> = addrs.into_iter().filter(|a| is_public(a.ip())).collect();
    if public.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} is not a public address", escape_line(netloc)),
        ));
    }
    Ok(public)
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

/// Whether the host of `u`, written as an address or `localhost`, is not public.
fn literal_is_internal(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(a)) => !is_public(IpAddr::V4(a)),
        Some(url::Host::Ipv6(a)) => !is_public(IpAddr::V6(a)),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        None => true,
    }
}

impl HttpPolicy {
    pub fn new(registries: Registries) -> HttpPolicy {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .resolver(resolve)
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("gantry/", env!("CARGO_PKG_VERSION")))
            .build();
        HttpPolicy { agent, registries }
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

    /// Checks one hop: its scheme, and that a host other than the
    /// registry's own is a public one.
    fn check_hop(&self, scope: &CallScope, u: &url::Url) -> Result<(), WitError> {
        self.check_scheme(u)?;
        if !scope.same_host(u) && literal_is_internal(u) {
            return Err(WitError::Denied(format!(
                "{} is an internal address; only the registry's own host may be one",
                redact_url(u.as_str())
            )));
        }
        Ok(())
    }

    /// Sends a request for a plugin within the call's `scope`.
    pub fn send(
        &self,
        scope: &mut CallScope,
        method: &str,
        url: &str,
        mut headers: Vec<(String, String)>,
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
        if method == "POST" && !is_realm {
            return Err(WitError::Denied(
                "HTTP method POST is allowed only to the registry's token realm in a pull".into(),
            ));
        }
        let mut left_endpoint = false;
        for _ in 0..=MAX_REDIRECTS {
            self.check_hop(scope, &u)?;
            let mut req = self.agent.request(method, u.as_str());
            for (k, v) in &headers {
                req = req.set(k, v);
            }
            PUBLIC_ONLY.set(!scope.same_host(&u));
            let called = req.call();
            PUBLIC_ONLY.set(false);
            let resp = match called {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(ureq::Error::Transport(t)) => {
                    // Built from the parts: ureq's own text starts with the
                    // whole URL, query and all.
                    let mut detail = t.kind().to_string();
                    if let Some(m) = t.message() {
                        detail.push_str(": ");
                        detail.push_str(m);
                    }
                    if let Some(src) = std::error::Error::source(&t) {
                        detail.push_str(": ");
                        detail.push_str(&src.to_string());
                    }
                    let msg = format!("{}: {}", redact_url(&origin(&u)), escape_line(&detail));
                    return Err(match t.kind() {
                        ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns | ureq::ErrorKind::InvalidUrl => {
                            WitError::Unreachable(msg)
                        }
                        ureq::ErrorKind::Io => WitError::Transient(msg),
                        _ => WitError::Unreachable(msg),
                    });
                }
            };
            let status = resp.status();
            if (300..400).contains(&status) && status != 304 {
                if let Some(loc) = resp.header("location") {
                    let next = u
                        .join(loc)
                        .map_err(|e| WitError::Invalid(format!("bad redirect {}: {e}", redact_url(loc))))?;
                    if origin(&next) != origin(&u) {
                        // Only reads may leave the origin, and never with the token.
                        if !matches!(method, "GET" | "HEAD") {
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
                if let Some(realm) = resp.header("www-authenticate").and_then(realm_of) {
                    if let Ok(r) = url::Url::parse(&realm) {
                        if self.check_hop(scope, &r).is_ok() && !scope.realms.contains(&origin(&r)) {
                            scope.realms.push(origin(&r));
                        }
                    }
                }
            }
            let headers = resp
                .headers_names()
                .into_iter()
                .filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_string())))
                .collect();
            return Ok(HttpResponse {
                status,
                headers,
                body: Box::new(resp.into_reader()),
            });
        }
        Err(WitError::Invalid(format!(
            "more than {MAX_REDIRECTS} redirects from {}",
            redact_url(url)
        )))
    }
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
    fn tells_public_addresses_from_internal_ones() {
        for a in [
            "127.0.0.2",
            "10.1.2.3",
            "169.254.169.254",
            "192.168.0.1",
            "100.64.0.1",
            "::1",
            "fd00::2",
            "::ffff:127.0.0.1",
            "0.0.0.0",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in ["1.1.1.1", "2606:4700::1111", "8.8.8.8"] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
        let scope = CallScope::pull("https://registry.example");
        let p = HttpPolicy::new(Registries::new());
        for u in [
            "https://127.0.0.1:2375/",
            "https://localhost/",
            "https://[::1]/",
            "https://169.254.169.254/",
        ] {
            assert!(p.check_hop(&scope, &url::Url::parse(u).unwrap()).is_err(), "{u}");
        }
        assert!(p
            .check_hop(&scope, &url::Url::parse("https://cdn.example/x").unwrap())
            .is_ok());
        let local = CallScope::pull("http://127.0.0.1:5000");
        assert!(p
            .check_hop(&local, &url::Url::parse("http://127.0.0.1:9000/x").unwrap())
            .is_ok());
        assert!(p
            .check_hop(&local, &url::Url::parse("http://127.0.0.2:9000/x").unwrap())
            .is_err());
    }
}
