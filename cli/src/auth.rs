//! Registry credentials as the Docker CLI finds them in its `config.json`,
//! in its order: the registry's `credHelpers` entry, else the `credsStore`,
//! else the secrets in `auths`. A registry a helper answers for gets the
//! helper's answer alone (as Docker: a stale `auths` secret is never
//! used instead). Helpers are run on demand ([`crate::credential_helper`]),
//! once per host and operation.
//!
//! Keys that name one registry in two ways (`docker.io`,
//! `https://index.docker.io/v1/`) resolve the same way every time: the
//! form Docker writes (the server address a helper is asked for) wins.

use base64::Engine as _;
use gantry_core::plugin::Credentials;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub struct AuthFile {
    by_host: HashMap<String, Credentials>,
    /// `credHelpers`: the helper of each (normalised) registry host.
    helpers: HashMap<String, String>,
    /// `credsStore`: the helper of every other host.
    store: Option<String>,
    timeout: Duration,
    /// What helpers answered, by host: a pull asks once per endpoint.
    /// Bounded by the hosts one operation reaches, and by [`MAX_ASKED`].
    asked: Mutex<HashMap<String, Option<Credentials>>>,
}

/// The most helper answers one [`AuthFile`] keeps.
const MAX_ASKED: usize = 64;

/// The address Docker files Docker Hub's credentials under.
const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";

#[derive(serde::Deserialize)]
struct File {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
    #[serde(rename = "credsStore", default)]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers", default)]
    cred_helpers: BTreeMap<String, String>,
}

/// The address Docker asks helpers for, and files `domain` under.
fn server_address(domain: &str) -> &str {
    match domain {
        gantry_core::reference::DEFAULT_DOMAIN => DOCKER_HUB_SERVER,
        d => d,
    }
}

/// Puts `value` under `key`'s registry unless the registry already has one
/// filed under its canonical key.
fn file_under<T>(map: &mut HashMap<String, T>, key: &str, value: T) {
    let host = normalise(key);
    let canonical = key == server_address(&host);
    if canonical || !map.contains_key(&host) {
        map.insert(host, value);
    }
}

#[derive(serde::Deserialize)]
struct Entry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// The default location: `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://host:5000` → `host:5000`.
fn normalise(key: &str) -> String {
    let k = key.trim_start_matches("https://").trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        k => k.to_string(),
    }
}

impl AuthFile {
    /// Reads `path`; a missing file means no credentials. Helpers get
    /// `timeout` to answer. Without `creds_store` (a daemon serving
    /// clients) the file's `credsStore` is passed over: it would answer,
    /// with the daemon's own keychain or cloud role, for whatever registry
    /// a client names; `credHelpers` name each registry they serve.
    pub fn load(path: Option<&Path>, timeout: Duration, creds_store: bool) -> anyhow::Result<AuthFile> {
        let Some(path) = path else {
            return Ok(AuthFile::default());
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AuthFile::default()),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        let f: File =
            serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))?;
        let valid = |what: &str, name: &str| {
            if crate::credential_helper::valid_name(name) {
                Ok(name.to_string())
            } else {
                Err(anyhow::anyhow!(
                    "{}: {what}: {} is not a credential helper's name",
                    path.display(),
                    gantry_core::text::quote_bytes(name.as_bytes())
                ))
            }
        };
        // Docker takes an empty credsStore as none.
        let store = match f.creds_store.as_deref() {
            None | Some("") => None,
            Some(name) => Some(valid("credsStore", name)?),
        }
        .filter(|_| creds_store);
        let mut helpers = HashMap::new();
        for (host, name) in &f.cred_helpers {
            file_under(&mut helpers, host, valid(&format!("credHelpers.{host}"), name)?);
        }
        let mut by_host = HashMap::new();
        for (k, e) in f.auths {
            let (username, password) = match (&e.auth, e.username, e.password) {
                (Some(a), _, _) if !a.is_empty() => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(a.trim())
                        .map_err(|_| anyhow::anyhow!("{}: auths.{k}.auth is not base64", path.display()))?;
                    let s = String::from_utf8_lossy(&raw).to_string();
                    let (u, p) = s
                        .split_once(':')
                        .ok_or_else(|| anyhow::anyhow!("{}: auths.{k}.auth is not user:password", path.display()))?;
                    (u.to_string(), p.to_string())
                }
                (_, Some(u), Some(p)) => (u, p),
                _ => continue,
            };
            file_under(
                &mut by_host,
                &k,
                Credentials {
                    username,
                    password,
                    identity_token: e.identitytoken.filter(|t| !t.is_empty()),
                },
            );
        }
        Ok(AuthFile {
            by_host,
            helpers,
            store,
            timeout,
            asked: Mutex::default(),
        })
    }

    /// `domain`'s credentials (`docker.io`, `host:port`): its helper's, else
    /// the store's, else the file's own. A helper that fails is an error,
    /// as for `docker pull`.
    pub fn get(&self, domain: &str) -> Result<Option<Credentials>, gantry_core::Error> {
        let Some(helper) = self.helpers.get(domain).or(self.store.as_ref()) else {
            return Ok(self.by_host.get(domain).cloned());
        };
        if let Some(known) = self.asked.lock().unwrap().get(domain) {
            return Ok(known.clone());
        }
        let server = server_address(domain);
        let answer = crate::credential_helper::get(helper, server, self.timeout).map_err(|message| {
            gantry_core::Error::Credentials {
                host: gantry_core::text::escape_line(domain),
                message,
            }
        })?;
        let mut asked = self.asked.lock().unwrap();
        if asked.len() < MAX_ASKED {
            asked.insert(domain.to_string(), answer.clone());
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(json: &str, creds_store: bool) -> AuthFile {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), json).unwrap();
        AuthFile::load(Some(t.path()), Duration::from_secs(1), creds_store).unwrap()
    }

    #[test]
    fn one_registry_named_twice_resolves_to_the_form_docker_writes() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        for _ in 0..8 {
            let a = load(
                &serde_json::json!({"auths": {
                    "docker.io": {"auth": b64("old:x")},
                    "https://index.docker.io/v1/": {"auth": b64("new:y")},
                    "index.docker.io": {"auth": b64("other:z")},
                }})
                .to_string(),
                true,
            );
            assert_eq!(a.get("docker.io").unwrap().unwrap().username, "new");
        }
    }

    #[test]
    fn a_daemon_passes_over_the_creds_store() {
        let json = r#"{"credsStore": "nosuchhelper-x", "credHelpers": {"r.example": "nosuchhelper-y"}}"#;
        let cli = load(json, true);
        assert!(cli.get("other.example").is_err());
        let daemon = load(json, false);
        assert_eq!(daemon.get("other.example").unwrap(), None);
        let e = daemon.get("r.example").unwrap_err().to_string();
        assert!(e.contains("docker-credential-nosuchhelper-y: not found in PATH"), "{e}");
    }
}
