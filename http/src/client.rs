//! The one outbound HTTP client: every connection gantry opens to a
//! registry, a redirect's target or a token realm is built here, and
//! every hop passes the core's [`HopPolicy`].
//!
//! The pieces, each used by both callers (the plugin host's call-scoped
//! client, [`crate::policy`], and the registry mirror's upstream fetches):
//! - [`Outbound`]: one hyper client per [`Reach`] over the one
//!   [`crate::connect::Connector`] (trust, client certificates, proxies),
//!   whose resolver keeps only the addresses that reach admits, so a name
//!   cannot resolve a redirect or a realm onto an internal service (the
//!   same rule as for a host written as an address);
//! - [`check_hop`]: a hop's address by the chain's hop policy, then its
//!   scheme (plain HTTP only where the caller allows it);
//! - [`learn_registry_address`]: where the registry's own host really is
//!   decides what else it may name;
//! - [`redirect`]: a redirect's target, refusing a non-read that would
//!   leave its origin;
//! - [`realm_of`]: the token realm a `Bearer` challenge names.

use bytes::Bytes;
use gantry_core::endpoint::{allows_plain_http, may_leave_origin, HopPolicy, Reach, Registries};
use gantry_core::text::{escape_line, redact_url};
use http_body_util::{BodyExt, Empty};
use std::sync::Arc;
use std::time::Duration;

pub use crate::connect::CONNECT_TIMEOUT;
use crate::connect::{Connector, Peer};
use crate::network::Network;

/// A request body: empty, or a stream fed through a channel.
pub type ReqBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// One hyper client over the one connector, for hops of one reach.
pub type Client = hyper_util::client::legacy::Client<Connector, ReqBody>;

/// A response as the client hands it back.
pub type Response = hyper::Response<hyper::body::Incoming>;

/// An empty request body.
pub fn empty() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// The clients, one per reach; connections are kept and reused per origin.
pub struct Outbound {
    /// For hops to the registry's own host, or a host it lists.
    any: Client,
    /// For hops an internal registry sends within internal networks.
    internal: Client,
    /// For every other hop: names resolve to public addresses only.
    public: Client,
    network: Arc<Network>,
}

impl Outbound {
    /// Builds the clients over `network`'s trust and proxies; must be
    /// called within a tokio runtime.
    pub fn new(network: Arc<Network>) -> Outbound {
        Outbound {
            any: client(Reach::Any, &network),
            internal: client(Reach::Internal, &network),
            public: client(Reach::Public, &network),
            network,
        }
    }

    /// Sends `req` on the client of `reach`: the one way every caller
    /// sends, so a plain-HTTP request through a proxy carries the proxy's
    /// credentials (an HTTPS one gives them in its tunnel's `CONNECT`).
    pub fn request(&self, reach: Reach, mut req: hyper::Request<ReqBody>) -> ResponseFuture {
        if req.uri().scheme_str() == Some("http") {
            let host = req.uri().host().unwrap_or("").to_string();
            let port = req.uri().port_u16().unwrap_or(80);
            if let Ok(Some(p)) = self.network.proxies.for_target(false, &host, port) {
                if let Some(v) = p.authorization.as_ref().and_then(|a| a.parse().ok()) {
                    req.headers_mut().insert(hyper::header::PROXY_AUTHORIZATION, v);
                }
            }
        }
        self.client(reach).request(req)
    }

    /// The client for a hop of this reach.
    fn client(&self, reach: Reach) -> &Client {
        match reach {
            Reach::Any => &self.any,
            Reach::Internal => &self.internal,
            Reach::Public => &self.public,
        }
    }
}

/// What [`Outbound::request`] answers with.
pub type ResponseFuture = hyper_util::client::legacy::ResponseFuture;

fn client(reach: Reach, network: &Arc<Network>) -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(Connector::new(reach, network.clone()))
}

/// Why a hop may not be made.
#[derive(Debug, thiserror::Error)]
pub enum HopError {
    /// The hop policy refused the address (the URL shown redacted).
    #[error("{url} {reason}")]
    Address { url: String, reason: String },
    /// Plain HTTP where the caller does not allow it.
    #[error(
        "plain HTTP to {} is not allowed (only loopback or registries marked insecure)",
        escape_line(domain)
    )]
    PlainHttp { url: String, domain: String },
    /// Neither `http` nor `https`.
    #[error("URL scheme {} is not allowed", escape_line(scheme))]
    Scheme { url: String, scheme: String },
}

/// Checks one hop: its address by the chain's `hops`, then its scheme
/// (`https`, or `http` when `plain_ok`). Returns what the hop may reach.
pub fn check_hop(hops: &HopPolicy, u: &url::Url, plain_ok: bool) -> Result<Reach, HopError> {
    let reach = hops
        .check(u.host_str().unwrap_or(""), u.port_or_known_default().unwrap_or(0))
        .map_err(|e| HopError::Address {
            url: redact_url(u.as_str()),
            reason: e.to_string(),
        })?;
    match u.scheme() {
        "https" => Ok(reach),
        "http" if plain_ok => Ok(reach),
        "http" => Err(HopError::PlainHttp {
            url: redact_url(u.as_str()),
            domain: domain_of(u),
        }),
        s => Err(HopError::Scheme {
            url: redact_url(u.as_str()),
            scheme: s.to_string(),
        }),
    }
}

/// Whether `u` may be reached over plain HTTP by the config: loopback, or
/// a registry marked insecure.
pub fn plain_http_allowed(u: &url::Url, registries: &Registries) -> bool {
    allows_plain_http(&domain_of(u), registries)
}

/// Records where the registry's own host answered from, when `u` is it.
pub fn learn_registry_address(hops: &mut HopPolicy, u: &url::Url, resp: &Response) {
    if hops.is_registry_host(u.host_str().unwrap_or("")) {
        if let Some(peer) = resp.extensions().get::<Peer>() {
            hops.saw_registry_at(peer.addr.ip());
        }
    }
}

/// Where a redirect leads.
pub struct Redirect {
    pub to: url::Url,
    /// Whether it leaves the origin of the hop it answered.
    pub leaves_origin: bool,
}

/// A redirect that may not be followed.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("bad redirect {}: {reason}", redact_url(location))]
    Bad { location: String, reason: String },
    /// Only reads may leave the origin.
    #[error("a {method} request was redirected to another origin ({})", redact_url(to))]
    CrossOrigin { method: String, to: String },
}

/// The redirect `resp` (to a `method` request for `u`) asks for: `None`
/// when it is not one (or names no `Location`).
pub fn redirect(u: &url::Url, method: &str, resp: &Response) -> Result<Option<Redirect>, RedirectError> {
    let status = resp.status();
    if !status.is_redirection() || status == hyper::StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    let Some(loc) = resp
        .headers()
        .get(hyper::header::LOCATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(None);
    };
    let to = u.join(loc).map_err(|e| RedirectError::Bad {
        location: loc.to_string(),
        reason: e.to_string(),
    })?;
    let leaves_origin = origin(&to) != origin(u);
    if leaves_origin && !may_leave_origin(method) {
        return Err(RedirectError::CrossOrigin {
            method: method.to_string(),
            to: to.to_string(),
        });
    }
    Ok(Some(Redirect { to, leaves_origin }))
}

/// The `realm` of a `Bearer` challenge.
pub fn realm_of(challenge: &str) -> Option<String> {
    let params = gantry_challenge::bearer(challenge)?;
    gantry_challenge::param(&params, "realm").map(str::to_string)
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

/// `host[:port]` of a URL, as the config's registry tables are keyed.
pub fn domain_of(u: &url::Url) -> String {
    match u.port() {
        Some(p) => format!("{}:{p}", u.host_str().unwrap_or("")),
        None => u.host_str().unwrap_or("").to_string(),
    }
}

/// An error and its causes on one line, with a hint where the server
/// refused the TLS handshake for want of a client certificate (the alert
/// arrives with the first answer, after the handshake, under TLS 1.3).
pub fn chain(e: &dyn std::error::Error) -> String {
    let s = causes(e);
    if ["alert: CertificateRequired", "alert: BadCertificate"]
        .iter()
        .any(|a| s.contains(a))
    {
        return format!(
            "{s} (the server wants a client certificate it trusts: a *.cert and its *.key in the registry's certs.d directory)"
        );
    }
    s
}

fn causes(e: &dyn std::error::Error) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realms_come_from_bearer_challenges_only() {
        assert_eq!(
            realm_of(r#"Bearer realm="http://a:1/t",service="x""#).as_deref(),
            Some("http://a:1/t")
        );
        assert_eq!(realm_of(r#"Basic realm="http://a:1/t""#), None);
    }
}
