//! Outgoing HTTP for transport plugins, filtered by the host.
//!
//! A transport may reach only the origins the core asked it to talk to
//! (the endpoint being pulled from) plus the token realm such an origin
//! names in a `WWW-Authenticate` challenge. Plain HTTP is refused except to
//! loopback or registries configured as insecure. Redirects are followed
//! here, not in the guest, and the `authorization` header is dropped when a
//! redirect leaves the origin, so a registry token never reaches a CDN.

use crate::plugin::bindings::WitError;
use gantry_core::endpoint::{allows_plain_http, Registries};
use std::collections::HashSet;
use std::io::Read;
use std::sync::Mutex;
use std::time::Duration;

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Box<dyn Read + Send>,
}

pub struct HttpPolicy {
    agent: ureq::Agent,
    allowed: Mutex<HashSet<String>>,
    registries: Registries,
}

const MAX_REDIRECTS: usize = 10;

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
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("gantry/", env!("CARGO_PKG_VERSION")))
            .build();
        HttpPolicy {
            agent,
            allowed: Mutex::new(HashSet::new()),
            registries,
        }
    }

    /// Lets plugins reach the origin of `base_url` (an endpoint).
    pub fn allow(&self, base_url: &str) {
        if let Ok(u) = url::Url::parse(base_url) {
            self.allowed.lock().unwrap().insert(origin(&u));
        }
    }

    fn check_scheme(&self, u: &url::Url) -> Result<(), WitError> {
        match u.scheme() {
            "https" => Ok(()),
            "http" if allows_plain_http(&domain_of(u), &self.registries) => Ok(()),
            "http" => Err(WitError::Denied(format!(
                "plain HTTP to {} is not allowed (only loopback or registries marked insecure)",
                domain_of(u)
            ))),
            s => Err(WitError::Denied(format!("URL scheme {s:?} is not allowed"))),
        }
    }

    /// Sends a request for a plugin.
    pub fn send(&self, method: &str, url: &str, mut headers: Vec<(String, String)>) -> Result<HttpResponse, WitError> {
        let mut u = url::Url::parse(url).map_err(|e| WitError::Invalid(format!("bad URL {url:?}: {e}")))?;
        if !self.allowed.lock().unwrap().contains(&origin(&u)) {
            return Err(WitError::Denied(format!(
                "the plugin may not connect to {}",
                origin(&u)
            )));
        }
        if !matches!(method, "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE") {
            return Err(WitError::Invalid(format!("HTTP method {method:?} is not allowed")));
        }
        for _ in 0..=MAX_REDIRECTS {
            self.check_scheme(&u)?;
            let mut req = self.agent.request(method, u.as_str());
            for (k, v) in &headers {
                req = req.set(k, v);
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(ureq::Error::Transport(t)) => {
                    let msg = format!("{}: {}", origin(&u), t);
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
                        .map_err(|e| WitError::Invalid(format!("bad redirect {loc:?}: {e}")))?;
                    if origin(&next) != origin(&u) {
                        headers.retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
                    }
                    u = next;
                    continue;
                }
            }
            if status == 401 {
                if let Some(realm) = resp.header("www-authenticate").and_then(realm_of) {
                    if let Ok(r) = url::Url::parse(&realm) {
                        self.allowed.lock().unwrap().insert(origin(&r));
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
            "more than {MAX_REDIRECTS} redirects from {url}"
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
    fn refuses_unlisted_origins_and_plain_http() {
        let p = HttpPolicy::new(Registries::new());
        p.allow("http://127.0.0.1:1");
        let e = p.send("GET", "http://127.0.0.2:1/v2/", vec![]).err().unwrap();
        assert!(matches!(e, WitError::Denied(_)), "{e:?}");
        p.allow("http://example.com");
        let e = p.send("GET", "http://example.com/v2/", vec![]).err().unwrap();
        assert!(matches!(e, WitError::Denied(m) if m.contains("plain HTTP")));
        assert_eq!(
            realm_of(r#"Bearer realm="http://a:1/t",service="x""#).as_deref(),
            Some("http://a:1/t")
        );
    }
}
