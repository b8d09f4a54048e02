//! Endpoint lookup: which URLs to try, in which order, for a registry domain,
//! and the per-hop rules every outbound request to a registry follows.
//!
//! Like Docker's `LookupPullEndpoints`: configured mirrors first, then the
//! registry itself over TLS, then — only for loopback or explicitly insecure
//! registries — plain HTTP.
//!
//! [`HopPolicy`] is the one statement of where a request chain that starts
//! at a registry may go (redirects, token realms), decided from addresses
//! alone so that every HTTP client gantry has (the transports' in the
//! host, the mirror's in the server) applies the same rules; the clients
//! only carry them out (a resolver that drops what a hop may not reach,
//! a literal check before connecting). It never touches the network.

use crate::plugin::Endpoint;
use crate::reference::DEFAULT_DOMAIN;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Per-registry settings from the config file's `[registries."domain"]` tables.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Mirror base URLs tried before the registry itself.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Allow plain HTTP to this registry even though it is not on loopback.
    #[serde(default)]
    pub insecure: bool,
    /// Whether the legacy v1 protocol may be tried, as the last endpoint.
    #[serde(default)]
    pub v1: bool,
    /// Hosts (`host` or `host:port`) this registry may redirect to or name
    /// as its token realm whatever network they are on: its storage
    /// service on another internal address, say.
    #[serde(default)]
    pub redirect_hosts: Vec<String>,
}

pub type Registries = BTreeMap<String, RegistryConfig>;

/// The settings of the registry at `domain` (`host[:port]`); Docker Hub's
/// API host reads the `docker.io` table.
pub fn registry_config<'a>(domain: &str, registries: &'a Registries) -> Option<&'a RegistryConfig> {
    registries.get(domain).or_else(|| {
        (domain == "registry-1.docker.io" || domain == "index.docker.io")
            .then(|| registries.get(DEFAULT_DOMAIN))
            .flatten()
    })
}

/// Whether `host` (without port) names this machine's loopback.
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::Ipv4Addr>().is_ok_and(|a| a.is_loopback())
        || h.parse::<std::net::Ipv6Addr>().is_ok_and(|a| a.is_loopback())
}

/// Splits `host[:port]` into the host part.
pub fn host_of(domain: &str) -> &str {
    if domain.starts_with('[') {
        return domain.split_once(']').map(|(h, _)| &h[1..]).unwrap_or(domain);
    }
    domain.rsplit_once(':').map(|(h, _)| h).unwrap_or(domain)
}

/// Whether plain HTTP to `domain` is allowed.
pub fn allows_plain_http(domain: &str, registries: &Registries) -> bool {
    is_loopback(host_of(domain)) || registries.get(domain).is_some_and(|r| r.insecure)
}

/// The endpoints to try for `domain`, in order.
pub fn pull_endpoints(domain: &str, registries: &Registries) -> Vec<Endpoint> {
    let mut out = Vec::new();
    if let Some(cfg) = registries.get(domain) {
        for m in &cfg.mirrors {
            let (url, name_prefix) = split_mirror_url(m);
            out.push(Endpoint {
                url,
                mirror: true,
                credentials: None,
                name_prefix,
                v1: false,
            });
        }
    }
    let host = if domain == DEFAULT_DOMAIN {
        "registry-1.docker.io"
    } else {
        domain
    };
    let plain = allows_plain_http(domain, registries);
    let v1 = registries.get(domain).is_some_and(|r| r.v1);
    for version in std::iter::once(false).chain(v1.then_some(true)) {
        for scheme in std::iter::once("https").chain(plain.then_some("http")) {
            out.push(Endpoint {
                url: format!("{scheme}://{host}"),
                mirror: false,
                credentials: None,
                name_prefix: None,
                v1: version,
            });
        }
    }
    out
}

/// A mirror URL split into its origin and the name prefix its path gives
/// (containerd's mirrors with a path; `gantry serve --mirror-of NAME=URL`
/// serves an upstream that way): `http://m:5000/hub/` → (`http://m:5000`, `hub`).
pub fn split_mirror_url(m: &str) -> (String, Option<String>) {
    let m = m.trim_end_matches('/');
    let Some((scheme, rest)) = m.split_once("://") else {
        return (m.to_string(), None);
    };
    match rest.split_once('/') {
        Some((authority, path)) if !path.is_empty() => {
            // `/v2` is where the API lives anyway, not a prefix.
            let path = path
                .strip_prefix("v2")
                .map(|p| p.trim_start_matches('/'))
                .unwrap_or(path);
            let prefix = (!path.is_empty()).then(|| path.to_string());
            (format!("{scheme}://{authority}"), prefix)
        }
        _ => (m.to_string(), None),
    }
}

/// The registry a `docker login` server address names: `https://index.docker.io/v1/`
/// (what the docker CLI sends for Docker Hub) and the like are `docker.io`;
/// otherwise the host and port, without scheme or path.
pub fn login_domain(server: &str) -> String {
    let s = server
        .strip_prefix("https://")
        .or_else(|| server.strip_prefix("http://"))
        .unwrap_or(server);
    let host = s.split('/').next().unwrap_or(s).to_ascii_lowercase();
    match host.as_str() {
        "" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" | "docker.io" => {
            DEFAULT_DOMAIN.to_string()
        }
        _ => host,
    }
}

/// Checks `credentials` against `domain` as `docker login` does: the
/// registry's own endpoints (never a mirror, never v1) are probed with them
/// in order (https, then plain http where allowed) and the first that takes
/// them is returned; a refusal of the credentials ends the search.
pub fn login(
    transport: &dyn crate::plugin::Transport,
    domain: &str,
    registries: &Registries,
    credentials: &crate::plugin::Credentials,
) -> crate::error::Result<String> {
    let mut last = None;
    for mut ep in pull_endpoints(domain, registries)
        .into_iter()
        .filter(|e| !e.mirror && !e.v1)
    {
        ep.credentials = Some(credentials.clone());
        match transport.probe(&ep) {
            Ok(_) => return Ok(ep.url),
            Err(e) if e.class == crate::error::ErrorClass::Unauthorized => {
                return Err(crate::error::Error::most_telling(last, e.into()))
            }
            Err(e) => crate::error::Error::keep_most_telling(&mut last, e.into()),
        }
    }
    Err(last.unwrap_or_else(|| crate::error::Error::Config(format!("no endpoint for {domain}"))))
}

/// How the HTTP client begins the message of every TLS failure (a
/// certificate refused, most often), so that it reads the same from every
/// face.
pub const TLS_FAILURE: &str = "TLS handshake";

/// The most redirects one request follows.
pub const MAX_REDIRECTS: usize = 10;

/// Whether a request with `method` may follow a redirect to another
/// origin: only reads may, and never with the registry's `Authorization`
/// (a client drops it once a chain has left the registry's origin).
pub fn may_leave_origin(method: &str) -> bool {
    matches!(method, "GET" | "HEAD")
}

/// The network an address is on, as the per-hop policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// The public internet.
    Public,
    /// This machine: 127.0.0.0/8, `::1`, `localhost`.
    Loopback,
    /// A private network: RFC 1918, shared address space (100.64.0.0/10),
    /// unique local IPv6 (fc00::/7).
    Private,
    /// The rest of what is not public: link-local (where clouds keep their
    /// metadata service, 169.254.169.254), unspecified, broadcast,
    /// multicast, documentation, benchmarking and reserved ranges.
    Special,
}

impl Network {
    fn internal(self) -> bool {
        matches!(self, Network::Loopback | Network::Private)
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Network::Public => "public",
            Network::Loopback => "loopback",
            Network::Private => "private",
            Network::Special => "link-local or reserved",
        })
    }
}

/// The network `ip` is on.
pub fn network_of(ip: IpAddr) -> Network {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if a.is_loopback() {
                Network::Loopback
            } else if a.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
                Network::Private
            } else if a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_documentation()
                || a.is_multicast()
                || o[0] == 0
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240
            {
                Network::Special
            } else {
                Network::Public
            }
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return network_of(IpAddr::V4(v4));
            }
            let s = a.segments();
            if a.is_loopback() {
                Network::Loopback
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Network::Private
            } else if a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
            {
                Network::Special
            } else {
                Network::Public
            }
        }
    }
}

/// Whether `ip` is an address on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    network_of(ip) == Network::Public
}

/// The network a host written as an address (or `localhost`) is on;
/// `None` for a name, which only resolving tells.
pub fn literal_network(host: &str) -> Option<Network> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(network_of(ip));
    }
    let d = h.trim_end_matches('.').to_ascii_lowercase();
    (d == "localhost" || d.ends_with(".localhost")).then_some(Network::Loopback)
}

/// Which addresses one hop may connect to: a client resolves a name to
/// these only, and refuses a host written as another address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reach {
    /// Any address: the registry's own host, or one the operator listed.
    Any,
    /// Public, loopback and private addresses (never link-local or
    /// reserved ones): a hop an internal registry sends within its network.
    Internal,
    /// Public addresses only.
    Public,
}

impl Reach {
    pub fn admits(self, ip: IpAddr) -> bool {
        match self {
            Reach::Any => true,
            Reach::Internal => matches!(network_of(ip), Network::Public | Network::Loopback | Network::Private),
            Reach::Public => is_public(ip),
        }
    }
}

/// A hop the policy refuses (the caller names the URL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("is an internal address ({network}); only the registry's own host{} or its redirect_hosts may be one", if *.internal_allowed { ", its network" } else { "" })]
pub struct HopRefused {
    pub network: Network,
    internal_allowed: bool,
}

/// Where one chain of requests that starts at a registry (its redirects,
/// the token realm it names) may connect.
///
/// - The registry's own host may be on any address: the operator (or the
///   client) chose it.
/// - A host listed in the registry's `redirect_hosts` may too.
/// - When the registry itself is on a loopback or private address and the
///   face allows it (`internal_redirects`: pulls do; the mirror does not,
///   since it hands what it fetched to its own clients), any other hop may
///   be on a public, loopback or private address — distribution beside
///   its MinIO on one private network. Link-local and reserved addresses
///   (cloud metadata) stay refused unless listed.
/// - Otherwise a hop reaches public addresses only: a public registry
///   cannot point gantry at an internal service, by a redirect, a realm or
///   a name that resolves inside (DNS rebinding).
///
/// Whether the registry is internal is read from its host when that is an
/// address, else from the address its connection reached
/// ([`HopPolicy::saw_registry_at`]); one public answer makes it public.
#[derive(Debug, Clone)]
pub struct HopPolicy {
    registry_host: String,
    registry_network: Option<Network>,
    internal_redirects: bool,
    redirect_hosts: Vec<String>,
}

/// `host` without IPv6 brackets, lowercased.
fn bare_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

impl HopPolicy {
    /// The policy for a chain starting at `registry_host`, with the
    /// registry's settings (its `redirect_hosts`) when it has a table.
    pub fn new(registry_host: &str, config: Option<&RegistryConfig>, internal_redirects: bool) -> HopPolicy {
        HopPolicy {
            registry_host: bare_host(registry_host),
            registry_network: literal_network(registry_host),
            internal_redirects,
            redirect_hosts: config.map(|c| c.redirect_hosts.clone()).unwrap_or_default(),
        }
    }

    /// Whether `host` is the registry's own (any port).
    pub fn is_registry_host(&self, host: &str) -> bool {
        !self.registry_host.is_empty() && bare_host(host) == self.registry_host
    }

    /// Records the address a connection to the registry's own host reached.
    pub fn saw_registry_at(&mut self, ip: IpAddr) {
        let seen = network_of(ip);
        self.registry_network = Some(match self.registry_network {
            None => seen,
            // Once seen outside an internal network, it stays outside.
            Some(n) if !n.internal() => n,
            Some(_) if !seen.internal() => seen,
            Some(n) => n,
        });
    }

    /// The network the registry was found on, when known.
    pub fn registry_network(&self) -> Option<Network> {
        self.registry_network
    }

    fn listed(&self, host: &str, port: u16) -> bool {
        let host = bare_host(host);
        self.redirect_hosts.iter().any(|entry| {
            let (h, p) = match entry.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => (h, p.parse::<u16>().ok()),
                _ => (entry.as_str(), None),
            };
            bare_host(h) == host && p.is_none_or(|p| p == port)
        })
    }

    /// What a hop to `host:port` may reach.
    pub fn reach(&self, host: &str, port: u16) -> Reach {
        if self.is_registry_host(host) || self.listed(host, port) {
            Reach::Any
        } else if self.internal_redirects && self.registry_network.is_some_and(Network::internal) {
            Reach::Internal
        } else {
            Reach::Public
        }
    }

    /// Checks a hop before connecting: a host written as an address (or
    /// `localhost`) must be one its reach admits. Returns the reach the
    /// client's resolver applies to a name.
    pub fn check(&self, host: &str, port: u16) -> Result<Reach, HopRefused> {
        let reach = self.reach(host, port);
        let admitted = match literal_network(host) {
            None | Some(Network::Public) => true,
            Some(n) => match reach {
                Reach::Any => true,
                Reach::Internal => n.internal(),
                Reach::Public => false,
            },
        };
        if admitted {
            Ok(reach)
        } else {
            Err(HopRefused {
                network: literal_network(host).unwrap_or(Network::Special),
                internal_allowed: self.internal_redirects,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_gets_http_fallback_and_mirrors_come_first() {
        let mut regs = Registries::new();
        regs.insert(
            "docker.io".into(),
            RegistryConfig {
                mirrors: vec!["http://127.0.0.1:5001/".into()],
                ..Default::default()
            },
        );
        let urls: Vec<_> = pull_endpoints("docker.io", &regs)
            .into_iter()
            .map(|e| (e.url, e.mirror))
            .collect();
        assert_eq!(
            urls,
            vec![
                ("http://127.0.0.1:5001".into(), true),
                ("https://registry-1.docker.io".into(), false)
            ]
        );
        let urls: Vec<_> = pull_endpoints("127.0.0.1:5000", &regs)
            .into_iter()
            .map(|e| e.url)
            .collect();
        assert_eq!(urls, vec!["https://127.0.0.1:5000", "http://127.0.0.1:5000"]);
        assert_eq!(pull_endpoints("quay.io", &regs).len(), 1);
        assert!(is_loopback("127.8.0.1") && is_loopback("[::1]") && !is_loopback("10.0.0.1"));
    }

    #[test]
    fn a_mirror_path_is_a_name_prefix() {
        assert_eq!(split_mirror_url("http://m:5000"), ("http://m:5000".into(), None));
        assert_eq!(split_mirror_url("http://m:5000/"), ("http://m:5000".into(), None));
        assert_eq!(split_mirror_url("http://m:5000/v2/"), ("http://m:5000".into(), None));
        assert_eq!(
            split_mirror_url("https://m/hub/"),
            ("https://m".into(), Some("hub".into()))
        );
        assert_eq!(
            split_mirror_url("https://m/v2/a/b"),
            ("https://m".into(), Some("a/b".into()))
        );
        let mut regs = Registries::new();
        regs.insert(
            "docker.io".into(),
            RegistryConfig {
                mirrors: vec!["http://127.0.0.1:5001/hub".into()],
                ..Default::default()
            },
        );
        let ep = &pull_endpoints("docker.io", &regs)[0];
        assert_eq!(ep.repository("library/alpine"), "hub/library/alpine");
        assert_eq!(ep.configured_url(), "http://127.0.0.1:5001/hub");
    }

    #[test]
    fn v1_is_the_last_endpoint_and_only_when_enabled() {
        let mut regs = Registries::new();
        regs.insert(
            "127.0.0.1:5000".into(),
            RegistryConfig {
                v1: true,
                ..Default::default()
            },
        );
        let eps: Vec<_> = pull_endpoints("127.0.0.1:5000", &regs)
            .into_iter()
            .map(|e| (e.url, e.v1))
            .collect();
        assert_eq!(
            eps,
            vec![
                ("https://127.0.0.1:5000".into(), false),
                ("http://127.0.0.1:5000".into(), false),
                ("https://127.0.0.1:5000".into(), true),
                ("http://127.0.0.1:5000".into(), true),
            ]
        );
        assert!(pull_endpoints("quay.io", &regs).iter().all(|e| !e.v1));
    }

    #[test]
    fn login_server_addresses_name_their_registry() {
        assert_eq!(login_domain("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(login_domain(""), "docker.io");
        assert_eq!(login_domain("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(
            login_domain("http://Registry.Example:5000/v2/"),
            "registry.example:5000"
        );
    }

    #[test]
    fn addresses_are_told_apart_by_network() {
        for (a, n) in [
            ("127.0.0.2", Network::Loopback),
            ("::1", Network::Loopback),
            ("::ffff:127.0.0.1", Network::Loopback),
            ("10.1.2.3", Network::Private),
            ("192.168.0.1", Network::Private),
            ("100.64.0.1", Network::Private),
            ("fd00::2", Network::Private),
            ("169.254.169.254", Network::Special),
            ("fe80::1", Network::Special),
            ("0.0.0.0", Network::Special),
            ("240.0.0.1", Network::Special),
            ("1.1.1.1", Network::Public),
            ("2606:4700::1111", Network::Public),
        ] {
            assert_eq!(network_of(a.parse().unwrap()), n, "{a}");
        }
        assert_eq!(literal_network("[::1]"), Some(Network::Loopback));
        assert_eq!(literal_network("LocalHost."), Some(Network::Loopback));
        assert_eq!(literal_network("registry.example"), None);
    }

    #[test]
    fn a_public_registry_reaches_public_hosts_only() {
        let p = HopPolicy::new("registry.example", None, true);
        assert_eq!(p.check("registry.example", 443), Ok(Reach::Any));
        assert_eq!(p.check("cdn.example", 443), Ok(Reach::Public));
        for h in ["127.0.0.1", "localhost", "[::1]", "10.0.0.5", "169.254.169.254"] {
            let e = p.check(h, 80).unwrap_err();
            assert!(e.to_string().contains("is an internal address"), "{h}: {e}");
        }
        // A name decides nothing until it resolved; its connection tells.
        let mut p = HopPolicy::new("registry.example", None, true);
        p.saw_registry_at("10.0.0.5".parse().unwrap());
        assert_eq!(p.check("10.0.0.6", 9000), Ok(Reach::Internal));
        p.saw_registry_at("1.1.1.1".parse().unwrap());
        p.saw_registry_at("10.0.0.5".parse().unwrap());
        assert_eq!(p.registry_network(), Some(Network::Public));
        assert!(p.check("10.0.0.6", 9000).is_err());
    }

    #[test]
    fn an_internal_registry_may_send_pulls_within_its_network() {
        let p = HopPolicy::new("127.0.0.1", None, true);
        assert_eq!(p.check("127.0.0.1", 9000), Ok(Reach::Any));
        assert_eq!(p.check("127.0.0.3", 9000), Ok(Reach::Internal));
        assert_eq!(p.check("10.0.0.6", 9000), Ok(Reach::Internal));
        assert_eq!(p.check("minio.internal", 9000), Ok(Reach::Internal));
        assert!(p.check("169.254.169.254", 80).is_err(), "metadata stays out");
        assert!(Reach::Internal.admits("10.0.0.6".parse().unwrap()));
        assert!(!Reach::Internal.admits("169.254.169.254".parse().unwrap()));
        assert!(!Reach::Public.admits("127.0.0.1".parse().unwrap()));
        // The mirror's rule: its upstream's network is not its clients'.
        let m = HopPolicy::new("127.0.0.1", None, false);
        assert!(m.check("127.0.0.2", 9000).is_err());
        assert_eq!(m.check("minio.internal", 9000), Ok(Reach::Public));
    }

    #[test]
    fn redirect_hosts_allow_the_hosts_they_list() {
        let cfg = RegistryConfig {
            redirect_hosts: vec!["127.0.0.2".into(), "minio.internal:9000".into(), "[fd00::9]:80".into()],
            ..Default::default()
        };
        let p = HopPolicy::new("registry.example", Some(&cfg), false);
        assert_eq!(p.check("127.0.0.2", 1234), Ok(Reach::Any));
        assert_eq!(p.check("MINIO.internal", 9000), Ok(Reach::Any));
        assert_eq!(p.check("minio.internal", 9001), Ok(Reach::Public));
        assert_eq!(p.check("[fd00::9]", 80), Ok(Reach::Any));
        assert!(p.check("127.0.0.3", 1234).is_err());
        let mut regs = Registries::new();
        regs.insert("docker.io".into(), cfg.clone());
        assert_eq!(registry_config("registry-1.docker.io", &regs), Some(&cfg));
        assert_eq!(registry_config("quay.io", &regs), None);
    }
}
