//! A token server for distribution's token auth, so a test can run a
//! registry where each user sees only what a real one would let them see.
//!
//! `docker-registry` checks the bearer tokens itself (`auth.token` in its
//! config: the realm, the service, the issuer, and the certificate that
//! signs); this server issues them as Docker Hub's does: `GET /token` with
//! optional basic credentials and the scopes a client asks for, answered
//! with an ES256 JWT granting what the user may do. The policy is fixed and
//! simple: a user may pull and push the repositories under `<user>/`;
//! everyone, anonymous clients too, may pull those under `public/`; wrong
//! credentials get 401. Keys are made with the `openssl` command, and each
//! token is signed with it too (no signing crate in the tests).

use base64::Engine as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The `service` the registry and its tokens name.
pub const SERVICE: &str = "gantry-test-registry";
/// The `iss` of every token, which the registry trusts.
pub const ISSUER: &str = "gantry-test-token-server";

/// One token the server issued: to whom, and what it grants.
#[derive(Debug, Clone)]
pub struct Issued {
    pub user: Option<String>,
    pub access: Vec<(String, Vec<String>)>,
}

pub struct TokenServer {
    pub port: u16,
    dir: tempfile::TempDir,
    users: Arc<Vec<(String, String)>>,
    /// Every token issued, in order.
    pub issued: Arc<Mutex<Vec<Issued>>>,
    /// Requests refused for wrong credentials.
    pub refused: Arc<Mutex<usize>>,
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

fn openssl(args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running openssl");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(i) = input {
        stdin.write_all(i).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// An ECDSA signature as DER (`SEQUENCE { INTEGER r, INTEGER s }`, what
/// openssl writes) in JWS form: `r || s`, 32 bytes each.
fn der_to_jws(der: &[u8]) -> Vec<u8> {
    assert_eq!(der[0], 0x30, "not a DER signature");
    let mut i = 2;
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        assert_eq!(der[i], 0x02);
        let len = der[i + 1] as usize;
        let mut n = &der[i + 2..i + 2 + len];
        while n.len() > 32 && n[0] == 0 {
            n = &n[1..];
        }
        out.extend(std::iter::repeat_n(0u8, 32 - n.len()));
        out.extend_from_slice(n);
        i += 2 + len;
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What `user` (or an anonymous client) may do of `actions` on `name`.
fn grant(user: Option<&str>, name: &str, actions: &[&str]) -> Vec<String> {
    let own = user.is_some_and(|u| name.starts_with(&format!("{u}/")));
    let public = name.starts_with("public/");
    actions
        .iter()
        .filter(|a| own && matches!(**a, "pull" | "push") || public && **a == "pull")
        .map(|a| a.to_string())
        .collect()
}

impl TokenServer {
    /// Starts the server with these `(user, password)` accounts.
    pub fn start(users: &[(&str, &str)]) -> TokenServer {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=gantry-test-token-server",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ],
            None,
        );
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = TokenServer {
            port,
            dir,
            users: Arc::new(users.iter().map(|(u, p)| (u.to_string(), p.to_string())).collect()),
            issued: Default::default(),
            refused: Default::default(),
            next: Default::default(),
            stop: Default::default(),
        };
        let signer = server.signer();
        let (users, issued, refused, stop) = (
            server.users.clone(),
            server.issued.clone(),
            server.refused.clone(),
            server.stop.clone(),
        );
        std::thread::spawn(move || {
            for s in l.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(s) = s else { continue };
                let (signer, users, issued, refused) = (signer.clone(), users.clone(), issued.clone(), refused.clone());
                std::thread::spawn(move || answer(s, &signer, &users, &issued, &refused));
            }
        });
        crate::registry::wait_for(&format!("127.0.0.1:{port}"));
        server
    }

    fn signer(&self) -> Signer {
        let pem = std::fs::read_to_string(self.dir.path().join("cert.pem")).unwrap();
        let der_b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        Signer {
            key: self.dir.path().join("key.pem"),
            x5c: der_b64,
            next: self.next.clone(),
        }
    }

    /// The realm a registry names in its challenges.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The certificate the registry trusts tokens from.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// A token for `user` granting `access`, made here (for a test that
    /// asks the registry directly what it holds).
    pub fn token(&self, user: Option<&str>, access: &[(&str, &[&str])]) -> String {
        let access: Vec<(String, Vec<String>)> = access
            .iter()
            .map(|(n, a)| (n.to_string(), a.iter().map(|s| s.to_string()).collect()))
            .collect();
        self.signer().sign(user, &access)
    }

    /// The tags the registry holds for `repository`, asked with a token
    /// that may pull it (an empty list when it has none).
    pub fn tags(&self, registry: &str, repository: &str) -> Vec<String> {
        let token = self.token(None, &[(repository, &["pull"])]);
        match ureq::get(&format!("http://{registry}/v2/{repository}/tags/list"))
            .set("Authorization", &format!("Bearer {token}"))
            .call()
        {
            Ok(r) => {
                let v: serde_json::Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
                v["tags"]
                    .as_array()
                    .map(|t| t.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
                    .unwrap_or_default()
            }
            Err(ureq::Error::Status(404, _)) => Vec::new(),
            Err(e) => panic!("listing the tags of {repository}: {e}"),
        }
    }
}

#[derive(Clone)]
struct Signer {
    key: PathBuf,
    x5c: String,
    next: Arc<AtomicU64>,
}

impl Signer {
    fn sign(&self, user: Option<&str>, access: &[(String, Vec<String>)]) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": user.unwrap_or(""),
            "aud": SERVICE,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now - 60,
            "jti": format!("t{}", self.next.fetch_add(1, Ordering::Relaxed)),
            "access": access.iter().map(|(name, actions)| serde_json::json!({
                "type": "repository", "name": name, "actions": actions,
            })).collect::<Vec<_>>(),
        });
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let der = openssl(
            &["dgst", "-sha256", "-sign", self.key.to_str().unwrap()],
            Some(input.as_bytes()),
        );
        format!("{input}.{}", b64url(&der_to_jws(&der)))
    }
}

fn answer(
    s: TcpStream,
    signer: &Signer,
    users: &[(String, String)],
    issued: &Mutex<Vec<Issued>>,
    refused: &Mutex<usize>,
) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    let target = line.split_whitespace().nth(1).unwrap_or("");
    let reply = |w: &mut TcpStream, status: u16, body: &str| {
        let _ = write!(
            w,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    // Who asks: nobody, a known user, or someone to refuse.
    let user = match authorization.as_deref().and_then(|a| a.strip_prefix("Basic ")) {
        None => None,
        Some(b) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .unwrap_or_default();
            match decoded.split_once(':') {
                Some((u, p)) if users.iter().any(|(uu, pp)| uu == u && pp == p) => Some(u.to_string()),
                _ => {
                    *refused.lock().unwrap() += 1;
                    reply(
                        &mut w,
                        401,
                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
                    );
                    return;
                }
            }
        }
    };
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut access = Vec::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if k != "scope" {
            continue;
        }
        let scope = percent_decode(v);
        for one in scope.split(' ') {
            let mut parts = one.splitn(3, ':');
            let (Some("repository"), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let actions: Vec<&str> = actions.split(',').collect();
            let granted = grant(user.as_deref(), name, &actions);
            if !granted.is_empty() {
                access.push((name.to_string(), granted));
            }
        }
    }
    let token = signer.sign(user.as_deref(), &access);
    issued.lock().unwrap().push(Issued { user, access });
    reply(
        &mut w,
        200,
        &format!(r#"{{"token":"{token}","access_token":"{token}"}}"#),
    );
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
