//! Endpoint lookup: which URLs to try, in which order, for a registry domain.
//!
//! Like Docker's `LookupPullEndpoints`: configured mirrors first, then the
//! registry itself over TLS, then — only for loopback or explicitly insecure
//! registries — plain HTTP.

use crate::plugin::Endpoint;
use crate::reference::DEFAULT_DOMAIN;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Per-registry settings from the config file's `[registries."domain"]` tables.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
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
}

pub type Registries = BTreeMap<String, RegistryConfig>;

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
            Err(e) if e.class == crate::error::ErrorClass::Unauthorized => return Err(e.into()),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .map(crate::error::Error::from)
        .unwrap_or_else(|| crate::error::Error::Config(format!("no endpoint for {domain}"))))
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
                insecure: false,
                v1: false,
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
                insecure: false,
                v1: false,
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
}
