//! Basic auth for the registry's write side from an htpasswd file, as
//! distribution reads it: one `user:hash` per line, bcrypt hashes only
//! (`htpasswd -B`); other schemes are refused when the file is read, not
//! silently never matched.
//!
//! bcrypt is slow on purpose, and a push sends dozens of requests: a
//! header that verified once is remembered (by its SHA-256, never in
//! clear) for the life of the process.

use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}, line {line}: not `user:bcrypt-hash` (create entries with `htpasswd -B`)")]
    Entry { path: String, line: usize },
}

pub struct Htpasswd {
    users: HashMap<String, String>,
    /// SHA-256 of `Authorization` values that verified.
    verified: Mutex<HashSet<[u8; 32]>>,
}

/// At most this many verified headers are remembered.
const REMEMBERED: usize = 4096;

impl Htpasswd {
    pub fn read(path: &Path) -> Result<Htpasswd, HtpasswdError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| HtpasswdError::Read {
            path: shown.clone(),
            source,
        })?;
        Htpasswd::parse(&text).map_err(|line| HtpasswdError::Entry { path: shown, line })
    }

    /// Parses the file's text; `Err(line)` names the first bad line.
    pub fn parse(text: &str) -> Result<Htpasswd, usize> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or(i + 1)?;
            if user.is_empty() || !["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
                return Err(i + 1);
            }
            users.insert(user.to_string(), hash.to_string());
        }
        Ok(Htpasswd {
            users,
            verified: Mutex::new(HashSet::new()),
        })
    }

    /// Whether an `Authorization` header value names a user of the file
    /// with the right password.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        let Some(value) = authorization else { return false };
        let key: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        if self.verified.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
            return true;
        }
        let Some(encoded) = value
            .split_once(' ')
            .filter(|(s, _)| s.eq_ignore_ascii_case("basic"))
            .map(|(_, c)| c.trim())
        else {
            return false;
        };
        use base64::Engine as _;
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = decoded.split_once(':') else {
            return false;
        };
        let ok = self
            .users
            .get(user)
            .is_some_and(|hash| bcrypt::verify(password, hash).unwrap_or(false));
        if ok {
            let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if v.len() >= REMEMBERED {
                v.clear();
            }
            v.insert(key);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listed_user_with_the_right_password_is_allowed() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let h = Htpasswd::parse(&format!("# writers\nalice:{hash}\n")).unwrap();
        use base64::Engine as _;
        let basic = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        assert!(h.allows(Some(&basic("alice:s3cret"))));
        assert!(h.allows(Some(&basic("alice:s3cret"))), "remembered");
        assert!(!h.allows(Some(&basic("alice:wrong"))));
        assert!(!h.allows(Some(&basic("bob:s3cret"))));
        assert!(!h.allows(Some("Bearer abc")));
        assert!(!h.allows(None));
        assert_eq!(Htpasswd::parse("alice:{SHA}abc").err(), Some(1), "only bcrypt");
        assert_eq!(Htpasswd::parse("\nnocolon").err(), Some(2));
    }
}
