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
            });
        }
    }
    let host = if domain == DEFAULT_DOMAIN {
        "registry-1.docker.io"
    } else {
        domain
    };
    out.push(Endpoint {
        url: format!("https://{host}"),
        mirror: false,
        credentials: None,
        name_prefix: None,
    });
    if allows_plain_http(domain, registries) {
        out.push(Endpoint {
            url: format!("http://{host}"),
            mirror: false,
            credentials: None,
            name_prefix: None,
        });
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
            },
        );
        let ep = &pull_endpoints("docker.io", &regs)[0];
        assert_eq!(ep.repository("library/alpine"), "hub/library/alpine");
        assert_eq!(ep.configured_url(), "http://127.0.0.1:5001/hub");
    }
}
