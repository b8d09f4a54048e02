//! Forward proxies: which connections go through one, as Docker decides it.
//!
//! `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` (or their lowercase forms; the
//! config's `[network]` keys win over them) with Go's `httpproxy` rules,
//! which Docker, containerd and skopeo all follow:
//! - `NO_PROXY` is a comma-separated list of IP addresses, CIDR ranges,
//!   domain names (`example.com` matches it and every subdomain,
//!   `.example.com` only subdomains, `*.example.com` the same) and `*`
//!   (nothing is proxied); any entry may carry a port (`host:5000`),
//!   matching that port only;
//! - loopback (`localhost`, 127.0.0.0/8, `::1`) is never proxied.
//!
//! Written here rather than taken from `hyper-util`'s matcher: that one
//! follows curl (`.example.com` matches `example.com` itself, no ports, no
//! loopback rule) and drops a proxy URL it cannot parse without a word.
//! A proxy URL here is checked when a connection first needs it, and its
//! credentials are sent only to it (`Proxy-Authorization`), never shown:
//! every message names the proxy by [`ProxyUrl::shown`].

use base64::Engine;
use gantry_core::endpoint::is_loopback;
use gantry_core::text::escape_line;
use std::net::IpAddr;

/// A proxy connections may go through.
#[derive(Clone)]
pub struct ProxyUrl {
    /// Host and port to connect to.
    pub host: String,
    pub port: u16,
    /// `Basic …` from the URL's user and password, if any.
    pub authorization: Option<String>,
}

impl ProxyUrl {
    /// Parses `http://[user[:password]@]host[:port]` (a missing scheme
    /// means `http`, a missing port 80, as Go reads these variables).
    pub fn parse(text: &str) -> Result<ProxyUrl, String> {
        let with_scheme = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        let u = url::Url::parse(&with_scheme).map_err(|e| format!("bad proxy URL {}: {e}", shown_raw(text)))?;
        if u.scheme() != "http" {
            return Err(format!(
                "proxy URL {}: only http:// proxies are supported, not {}",
                shown_raw(text),
                escape_line(u.scheme())
            ));
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("proxy URL {} names no host", shown_raw(text)))?;
        let authorization = (!u.username().is_empty()).then(|| {
            let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
            let pair = format!("{}:{}", decode(u.username()), decode(u.password().unwrap_or("")));
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
        });
        Ok(ProxyUrl {
            host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            port: u.port().unwrap_or(80),
            authorization,
        })
    }

    /// How messages name the proxy: its address, never its credentials.
    pub fn shown(&self) -> String {
        if self.host.contains(':') {
            format!("proxy [{}]:{}", escape_line(&self.host), self.port)
        } else {
            format!("proxy {}:{}", escape_line(&self.host), self.port)
        }
    }
}

impl std::fmt::Debug for ProxyUrl {
    /// The credentials stay out of debug output too.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

/// A proxy URL as written, without what precedes an `@`.
fn shown_raw(text: &str) -> String {
    let rest = text.rsplit_once('@').map(|(_, r)| r).unwrap_or(text);
    escape_line(rest.rsplit_once("://").map(|(_, r)| r).unwrap_or(rest))
}

/// Where connections go: directly, or through which proxy.
#[derive(Debug, Default)]
pub struct Proxies {
    https: Option<Result<ProxyUrl, String>>,
    http: Option<Result<ProxyUrl, String>>,
    no_proxy: NoProxy,
}

impl Proxies {
    /// From the config's values, each falling back to the environment's.
    pub fn new(https: Option<&str>, http: Option<&str>, no_proxy: Option<&str>) -> Proxies {
        let env = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        let https = https
            .map(str::to_string)
            .or_else(|| env(["HTTPS_PROXY", "https_proxy"]));
        let http = http.map(str::to_string).or_else(|| env(["HTTP_PROXY", "http_proxy"]));
        let no = no_proxy.map(str::to_string).or_else(|| env(["NO_PROXY", "no_proxy"]));
        Proxies {
            https: https.filter(|s| !s.is_empty()).map(|s| ProxyUrl::parse(&s)),
            http: http.filter(|s| !s.is_empty()).map(|s| ProxyUrl::parse(&s)),
            no_proxy: NoProxy::parse(no.as_deref().unwrap_or("")),
        }
    }

    /// The proxy a connection to `host:port` goes through, if any; an
    /// error when the one it would take cannot be parsed.
    pub fn for_target(&self, tls: bool, host: &str, port: u16) -> Result<Option<&ProxyUrl>, String> {
        let chosen = if tls { &self.https } else { &self.http };
        let Some(chosen) = chosen else {
            return Ok(None);
        };
        if self.no_proxy.bypasses(host, port) {
            return Ok(None);
        }
        chosen.as_ref().map(Some).map_err(Clone::clone)
    }
}

/// The hosts `NO_PROXY` sends directly.
#[derive(Debug, Default)]
struct NoProxy {
    all: bool,
    /// Networks, with a port (0: any).
    networks: Vec<(ipnet::IpNet, u16)>,
    /// Lowercase names; a leading `.` matches subdomains only.
    names: Vec<(String, u16)>,
}

impl NoProxy {
    fn parse(list: &str) -> NoProxy {
        let mut out = NoProxy::default();
        for entry in list.split(',').map(|e| e.trim().to_ascii_lowercase()) {
            if entry.is_empty() {
                continue;
            }
            if entry == "*" {
                out.all = true;
                continue;
            }
            if let Ok(net) = entry.parse::<ipnet::IpNet>() {
                out.networks.push((net, 0));
                continue;
            }
            let (host, port) = split_port(&entry);
            if let Ok(ip) = host.parse::<IpAddr>() {
                out.networks.push((ipnet::IpNet::from(ip), port));
                continue;
            }
            let name = host
                .strip_prefix("*.")
                .map(|r| format!(".{r}"))
                .unwrap_or(host.to_string());
            out.names.push((name.trim_end_matches('.').to_string(), port));
        }
        out
    }

    fn bypasses(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if self.all || is_loopback(host) {
            return true;
        }
        let port_ok = |p: u16| p == 0 || p == port;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.networks.iter().any(|(n, p)| port_ok(*p) && n.contains(&ip));
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.names.iter().any(|(name, p)| {
            port_ok(*p)
                && match name.strip_prefix('.') {
                    Some(_) => host.ends_with(name.as_str()),
                    None => host == *name || host.strip_suffix(name.as_str()).is_some_and(|r| r.ends_with('.')),
                }
        })
    }
}

/// `host:port`, `[v6]:port`, or a bare host (port 0).
fn split_port(entry: &str) -> (&str, u16) {
    if let Some(rest) = entry.strip_prefix('[') {
        if let Some((h, after)) = rest.split_once(']') {
            return (h, after.strip_prefix(':').and_then(|p| p.parse().ok()).unwrap_or(0));
        }
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, port),
            Err(_) => (entry, 0),
        },
        _ => (entry, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(list: &str) -> NoProxy {
        NoProxy::parse(list)
    }

    #[test]
    fn no_proxy_follows_go_s_rules() {
        let n = np("example.com, .sub.test, *.star.test, 10.0.0.0/8, 192.168.1.5, reg.port:5000, [fd00::1]:443");
        assert!(n.bypasses("example.com", 443));
        assert!(n.bypasses("a.example.com", 443));
        assert!(!n.bypasses("badexample.com", 443));
        assert!(n.bypasses("x.sub.test", 443));
        assert!(!n.bypasses("sub.test", 443), "a leading dot matches subdomains only");
        assert!(n.bypasses("x.star.test", 443));
        assert!(n.bypasses("10.2.3.4", 443));
        assert!(!n.bypasses("11.2.3.4", 443));
        assert!(n.bypasses("192.168.1.5", 80));
        assert!(n.bypasses("reg.port", 5000));
        assert!(
            !n.bypasses("reg.port", 5001),
            "a port in an entry matches that port only"
        );
        assert!(n.bypasses("[fd00::1]", 443));
        assert!(!n.bypasses("fd00::1", 80));
        assert!(n.bypasses("EXAMPLE.com.", 443));
    }

    #[test]
    fn loopback_is_never_proxied_and_star_is_everything() {
        let n = np("");
        assert!(n.bypasses("localhost", 5000));
        assert!(n.bypasses("127.0.0.7", 5000));
        assert!(n.bypasses("[::1]", 5000));
        assert!(!n.bypasses("registry.example", 443));
        assert!(np("*").bypasses("registry.example", 443));
    }

    #[test]
    fn proxy_urls_keep_credentials_out_of_every_message() {
        let p = ProxyUrl::parse("http://user:s3cret%21@proxy.corp:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(p.authorization.as_deref(), Some("Basic dXNlcjpzM2NyZXQh"));
        assert!(!p.shown().contains("s3cret"));
        let p = ProxyUrl::parse("proxy.corp").unwrap();
        assert_eq!(p.port, 80);
        assert!(p.authorization.is_none());
        let e = ProxyUrl::parse("socks5://user:s3cret@proxy.corp:1080").unwrap_err();
        assert!(e.contains("only http://") && !e.contains("s3cret"), "{e}");
        let e = ProxyUrl::parse("http://user:s3cret@").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn the_config_wins_and_a_bad_url_fails_only_the_connections_that_need_it() {
        let p = Proxies::new(Some("ftp://x:1"), Some("http://p:3128"), Some("skip.me"));
        assert!(p.for_target(true, "r.example", 443).is_err());
        assert!(p.for_target(true, "skip.me", 443).unwrap().is_none());
        assert_eq!(p.for_target(false, "r.example", 80).unwrap().unwrap().host, "p");
    }
}
