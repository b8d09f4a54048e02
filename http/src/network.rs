//! The network settings every outbound client shares: the config file's
//! `[network]` table, and what it becomes — whom TLS trusts
//! ([`crate::trust`]), which proxy a connection takes ([`crate::proxy`]),
//! and names resolved by the config rather than by DNS.

use crate::proxy::Proxies;
use crate::trust::{Trust, DEFAULT_CERTS_DIRS};
use gantry_core::endpoint::Registries;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

/// The `[network]` table.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Directories of per-registry certificates (`<dir>/<host[:port]>/`
    /// with `*.crt` CAs and `*.cert` + `*.key` client certificates);
    /// default Docker's and containers' `/etc/…/certs.d`.
    pub certs_dirs: Option<Vec<PathBuf>>,
    /// The proxy of HTTPS connections (default `HTTPS_PROXY`).
    pub https_proxy: Option<String>,
    /// The proxy of plain HTTP connections (default `HTTP_PROXY`).
    pub http_proxy: Option<String>,
    /// Hosts reached directly (default `NO_PROXY`).
    pub no_proxy: Option<String>,
    /// Names resolved to this address instead of by DNS, as `/etc/hosts`
    /// or curl's `--resolve` would (split-horizon networks, tests); the
    /// address still passes the hop policy.
    pub hosts: BTreeMap<String, IpAddr>,
}

/// What every outbound connection is made with.
pub struct Network {
    pub trust: Trust,
    pub proxies: Proxies,
    /// Lowercase names to the address they resolve to.
    pub hosts: BTreeMap<String, IpAddr>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("proxies", &self.proxies)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Network {
    /// The settings from the config's `[network]` table (the environment
    /// filling what it leaves out) and its registry tables (which
    /// registries are insecure).
    pub fn new(config: &NetworkConfig, registries: &Registries) -> Network {
        let certs_dirs = config
            .certs_dirs
            .clone()
            .unwrap_or_else(|| DEFAULT_CERTS_DIRS.iter().map(PathBuf::from).collect());
        let insecure = registries
            .iter()
            .filter(|(_, r)| r.insecure)
            .map(|(d, _)| d.clone())
            .collect();
        Network {
            trust: Trust::new(certs_dirs, insecure),
            proxies: Proxies::new(
                config.https_proxy.as_deref(),
                config.http_proxy.as_deref(),
                config.no_proxy.as_deref(),
            ),
            hosts: config.hosts.iter().map(|(k, v)| (k.to_ascii_lowercase(), *v)).collect(),
        }
    }

    /// The settings with nothing configured: the system's trust store,
    /// the environment's proxies.
    pub fn from_env() -> Network {
        Network::new(&NetworkConfig::default(), &Registries::new())
    }

    /// The same settings, trusting `certs` too for every host.
    pub fn with_extra_roots(mut self, certs: Vec<rustls::pki_types::CertificateDer<'static>>) -> Network {
        self.trust = self.trust.with_extra_roots(certs);
        self
    }

    /// The address the config gives `host`, if any.
    pub fn host_override(&self, host: &str) -> Option<IpAddr> {
        self.hosts.get(&host.to_ascii_lowercase()).copied()
    }
}
