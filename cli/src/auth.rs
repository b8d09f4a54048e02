//! Registry credentials from a Docker-style `config.json` (`auths`).

use base64::Engine as _;
use gantry_core::plugin::Credentials;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Default)]
pub struct AuthFile {
    by_host: HashMap<String, Credentials>,
}

#[derive(serde::Deserialize)]
struct File {
    #[serde(default)]
    auths: HashMap<String, Entry>,
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
    /// Reads `path`; a missing file means no credentials.
    pub fn load(path: Option<&Path>) -> anyhow::Result<AuthFile> {
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
            by_host.insert(
                normalise(&k),
                Credentials {
                    username,
                    password,
                    identity_token: e.identitytoken.filter(|t| !t.is_empty()),
                },
            );
        }
        Ok(AuthFile { by_host })
    }

    pub fn get(&self, domain: &str) -> Option<Credentials> {
        self.by_host.get(domain).cloned()
    }
}
