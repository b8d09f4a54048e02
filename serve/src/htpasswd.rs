//! Basic auth for the registry's write side from an htpasswd file, as
//! distribution reads it: one `user:hash` per line, bcrypt hashes only
//! (`htpasswd -B`); other schemes are refused when the file is read, not
//! silently never matched.
//!
//! bcrypt is slow on purpose, so it never runs on the request workers: a
//! check runs on a blocking thread, at most [`Htpasswd::parallel`] at once
//! (half the cores), with at most [`MAX_PENDING`] checks waiting or running;
//! past that a client is told to come back (429) rather than queued without
//! end. A flood of wrong passwords then costs the checks' own CPU, not every
//! other request's latency. An unknown user is checked against a dummy hash
//! of the file's cost, so a refusal takes as long whether the user exists or
//! not. A push sends dozens of requests: a header that verified is
//! remembered (by its SHA-256, never in clear; at most [`REMEMBERED`], one
//! evicted per new one past that) for the life of the process.

use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}, line {line}: not `user:bcrypt-hash` (create entries with `htpasswd -B`)")]
    Entry { path: String, line: usize },
}

/// Too many password checks are waiting already.
#[derive(Debug, thiserror::Error)]
#[error("too many password checks in progress")]
pub struct Busy;

pub struct Htpasswd {
    users: HashMap<String, String>,
    /// What an unknown user's password is checked against: a hash of a
    /// random password at the file's highest cost.
    dummy: String,
    /// SHA-256 of `Authorization` values that verified.
    verified: Mutex<HashSet<[u8; 32]>>,
    /// Checks running at once.
    running: Arc<tokio::sync::Semaphore>,
    /// Checks waiting or running.
    pending: AtomicUsize,
}

/// At most this many verified headers are remembered.
const REMEMBERED: usize = 4096;

/// At most this many checks wait or run; more are answered "busy".
pub const MAX_PENDING: usize = 64;

/// The bcrypt cost of the dummy hash when the file names no user.
const DEFAULT_COST: u32 = 10;

/// Counts a check as pending for as long as it lives (a client that goes
/// away while waiting stops counting).
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Htpasswd {
    /// Checks running at once: half the cores, at least one.
    pub fn parallel() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get() / 2)
            .unwrap_or(1)
            .max(1)
    }

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
        let mut cost = None;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or(i + 1)?;
            if user.is_empty() || !["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
                return Err(i + 1);
            }
            let c: u32 = hash.get(4..6).and_then(|c| c.parse().ok()).ok_or(i + 1)?;
            if !(4..=31).contains(&c) {
                return Err(i + 1);
            }
            cost = cost.max(Some(c));
            users.insert(user.to_string(), hash.to_string());
        }
        let dummy = bcrypt::hash(gantry_core::store::random_id(), cost.unwrap_or(DEFAULT_COST)).map_err(|_| 0usize)?;
        Ok(Htpasswd {
            users,
            dummy,
            verified: Mutex::new(HashSet::new()),
            running: Arc::new(tokio::sync::Semaphore::new(Htpasswd::parallel())),
            pending: AtomicUsize::new(0),
        })
    }

    /// Whether an `Authorization` header value names a user of the file
    /// with the right password; `Err(Busy)` when too many checks wait.
    pub async fn check(&self, authorization: Option<&str>) -> Result<bool, Busy> {
        let Some(value) = authorization else { return Ok(false) };
        let key: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        if self.verified.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
            return Ok(true);
        }
        let Some((user, password)) = basic_credentials(value) else {
            return Ok(false);
        };
        let (known, hash) = match self.users.get(&user) {
            Some(h) => (true, h.clone()),
            None => (false, self.dummy.clone()),
        };
        let _pending = {
            if self.pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                return Err(Busy);
            }
            Pending(&self.pending)
        };
        let permit = self.running.clone().acquire_owned().await.map_err(|_| Busy)?;
        // The permit goes with the work: a client leaving does not free a
        // slot while its check still runs.
        let matched = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        let ok = known && matched;
        if ok {
            let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if v.len() >= REMEMBERED {
                if let Some(old) = v.iter().next().copied() {
                    v.remove(&old);
                }
            }
            v.insert(key);
        }
        Ok(ok)
    }
}

/// `(user, password)` of a `Basic` header value.
fn basic_credentials(value: &str) -> Option<(String, String)> {
    let encoded = value
        .split_once(' ')
        .filter(|(s, _)| s.eq_ignore_ascii_case("basic"))
        .map(|(_, c)| c.trim())?;
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listed_user_with_the_right_password_is_allowed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let h = Htpasswd::parse(&format!("# writers\nalice:{hash}\n")).unwrap();
        assert!(
            h.dummy.starts_with("$2b$04$"),
            "the dummy costs what the file's hashes cost"
        );
        use base64::Engine as _;
        let basic = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        let check = |v: Option<&str>| rt.block_on(h.check(v)).unwrap();
        assert!(check(Some(&basic("alice:s3cret"))));
        assert!(check(Some(&basic("alice:s3cret"))), "remembered");
        assert!(!check(Some(&basic("alice:wrong"))));
        assert!(!check(Some(&basic("bob:s3cret"))));
        assert!(!check(Some("Bearer abc")));
        assert!(!check(None));
        assert_eq!(h.pending.load(Ordering::Acquire), 0);
        assert_eq!(Htpasswd::parse("alice:{SHA}abc").err(), Some(1), "only bcrypt");
        assert_eq!(Htpasswd::parse("\nnocolon").err(), Some(2));
        assert_eq!(Htpasswd::parse("alice:$2y$xx$abc").err(), Some(1), "a cost");
    }

    #[test]
    fn checks_past_the_queue_are_told_to_come_back() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let h = Htpasswd::parse(&format!("alice:{}\n", bcrypt::hash("s3cret", 4).unwrap())).unwrap();
        h.pending.store(MAX_PENDING, Ordering::Release);
        use base64::Engine as _;
        let wrong = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("alice:x"));
        assert!(rt.block_on(h.check(Some(&wrong))).is_err());
        assert_eq!(
            h.pending.load(Ordering::Acquire),
            MAX_PENDING,
            "a refused check does not count"
        );
    }
}
