//! A forward HTTP proxy, as company networks make every client go through:
//! `CONNECT host:port` opens a tunnel (HTTPS), an absolute-form request
//! (`GET http://host:port/path`) is forwarded (plain HTTP). It may demand
//! Basic proxy credentials (407 otherwise), and it records every request
//! line and every `Proxy-Authorization` it saw, so a test can tell what
//! went through it, under which name, with which credentials — and that
//! nothing did.
//!
//! Host names of the tests (`reg.internal.test`) resolve nowhere: the proxy
//! has a map of overrides, as a company proxy has its own DNS.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Log {
    lines: Vec<String>,
    auth: Vec<String>,
}

pub struct ForwardProxy {
    pub port: u16,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
}

struct Shared {
    overrides: HashMap<String, String>,
    /// The whole `Proxy-Authorization` value required, if any.
    required: Option<String>,
    log: Arc<Mutex<Log>>,
}

/// `Basic base64(user:pass)`.
pub fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

impl ForwardProxy {
    /// Listens on 127.0.0.1 (a free port). `overrides` maps host names to
    /// the addresses the proxy connects to instead of resolving them;
    /// `required_auth` makes it answer 407 to any request without exactly
    /// these Basic credentials.
    pub fn start(overrides: &[(&str, &str)], required_auth: Option<(&str, &str)>) -> ForwardProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            overrides: overrides
                .iter()
                .map(|(h, a)| (h.to_ascii_lowercase(), a.to_string()))
                .collect(),
            required: required_auth.map(|(u, p)| basic(u, p)),
            log: log.clone(),
        });
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = c else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || serve(client, &shared));
            }
        });
        ForwardProxy { port, log, stop }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://USER:PASS@127.0.0.1:PORT`
    pub fn url_with_auth(&self, user: &str, pass: &str) -> String {
        format!("http://{user}:{pass}@127.0.0.1:{}", self.port)
    }

    /// Every request line read, in order (`CONNECT host:port HTTP/1.1`).
    pub fn seen(&self) -> Vec<String> {
        self.log.lock().unwrap().lines.clone()
    }

    /// Every `Proxy-Authorization` value received, in order.
    pub fn auth_seen(&self) -> Vec<String> {
        self.log.lock().unwrap().auth.clone()
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// `host:port` with the host mapped through the overrides.
fn target(shared: &Shared, authority: &str, default_port: u16) -> String {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p.parse().unwrap_or(default_port)),
        _ => (authority, default_port),
    };
    let host = shared
        .overrides
        .get(&host.to_ascii_lowercase())
        .map(String::as_str)
        .unwrap_or(host);
    format!("{host}:{port}")
}

fn answer(mut s: &TcpStream, status: &str, extra: &str) {
    let _ =
        s.write_all(format!("HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n").as_bytes());
    let _ = s.shutdown(Shutdown::Write);
}

/// Copies `from` to `to` until either ends, then closes both ways of both
/// (so the other direction's copy ends too).
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Relays `client` (whose reader already buffered `early` bytes) and
/// `upstream` both ways until one of them closes.
fn relay(client: TcpStream, early: &[u8], mut upstream: TcpStream) {
    if !early.is_empty() && upstream.write_all(early).is_err() {
        return;
    }
    let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let back = std::thread::spawn(move || pump(u2, c2));
    pump(client, upstream);
    let _ = back.join();
}

fn serve(client: TcpStream, shared: &Shared) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let line = line.trim_end().to_string();
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let auth = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, v)| v.clone());
    {
        let mut log = shared.log.lock().unwrap();
        log.lines.push(line.clone());
        log.auth.extend(auth.clone());
    }
    if let Some(required) = &shared.required {
        if auth.as_deref() != Some(required.as_str()) {
            answer(
                &client,
                "407 Proxy Authentication Required",
                "Proxy-Authenticate: Basic realm=\"test\"\r\n",
            );
            return;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(uri), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        answer(&client, "400 Bad Request", "");
        return;
    };
    let early = reader.buffer().to_vec();
    if method.eq_ignore_ascii_case("CONNECT") {
        let Ok(upstream) = TcpStream::connect(target(shared, uri, 443)) else {
            answer(&client, "502 Bad Gateway", "");
            return;
        };
        if (&client)
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .is_err()
        {
            return;
        }
        relay(client, &early, upstream);
        return;
    }
    // Absolute form: `GET http://host[:port]/path HTTP/1.1`.
    let Some(rest) = uri.strip_prefix("http://") else {
        answer(&client, "400 Bad Request", "");
        return;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Ok(mut upstream) = TcpStream::connect(target(shared, authority, 80)) else {
        answer(&client, "502 Bad Gateway", "");
        return;
    };
    let mut head = format!("{method} {path} {version}\r\n");
    for (k, v) in &headers {
        let k_lower = k.to_ascii_lowercase();
        if ["proxy-authorization", "proxy-connection", "connection", "keep-alive"].contains(&k_lower.as_str()) {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    if upstream.write_all(head.as_bytes()).is_err() {
        answer(&client, "502 Bad Gateway", "");
        return;
    }
    // The body (if any) and the answer are copied as they are; the
    // upstream closes after its answer (`Connection: close`), which ends
    // the client's connection too.
    relay(client, &early, upstream);
}

/// The fixtures, checked against curl (a client everyone agrees on): the
/// TLS registry under a name with the test CA, mutual TLS, and this proxy
/// (CONNECT with credentials, 407 without them, absolute-form HTTP).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use crate::tls::TestCa;
    use std::path::Path;

    /// `curl -sS -o /dev/null -w %{http_code} ARGS`: the status, or the
    /// error curl printed.
    fn curl(args: &[&str], extra: &[&Path]) -> Result<String, String> {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20"])
            .args(args)
            .args(extra)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    #[test]
    fn curl_reaches_the_tls_registry_directly_and_through_the_proxy() {
        if !(crate::require("docker-registry") && crate::require("openssl") && crate::require("curl")) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path());
        let other = TestCa::new(dir.path());
        let (cert, key) = ca.server_cert(&["reg.internal.test"], &["127.0.0.1"]);
        let reg = Registry::start_tls(&cert, &key, None);
        let host = format!("reg.internal.test:{}", reg.port);
        let resolve = format!("{host}:127.0.0.1");
        let url = format!("https://{host}/v2/");
        let cacert = ca.cert();
        let cacert = cacert.to_str().unwrap();

        assert_eq!(
            curl(&["--cacert", cacert, "--resolve", &resolve, &url], &[]),
            Ok("200".into())
        );
        let by_ip = format!("https://127.0.0.1:{}/v2/", reg.port);
        assert_eq!(curl(&["--cacert", cacert, &by_ip], &[]), Ok("200".into()));
        let err = curl(
            &["--cacert", other.cert().to_str().unwrap(), "--resolve", &resolve, &url],
            &[],
        )
        .unwrap_err();
        assert!(err.contains("certificate"), "{err}");

        // Through the proxy: a CONNECT by name, the credentials seen.
        let proxy = ForwardProxy::start(&[("reg.internal.test", "127.0.0.1")], Some(("user", "pw")));
        let with = proxy.url_with_auth("user", "pw");
        assert_eq!(curl(&["-x", &with, "--cacert", cacert, &url], &[]), Ok("200".into()));
        assert_eq!(proxy.seen(), vec![format!("CONNECT {host} HTTP/1.1")]);
        assert_eq!(proxy.auth_seen(), vec![basic("user", "pw")]);
        // Wrong credentials: 407, no tunnel.
        let wrong = proxy.url_with_auth("user", "nope");
        let err = curl(&["-x", &wrong, "--cacert", cacert, &url], &[]).unwrap_err();
        assert!(err.contains("407"), "{err}");
        // Plain HTTP through it: the absolute form, forwarded.
        let plain = Registry::start();
        let plain_url = format!("http://reg.internal.test:{}/v2/", plain.port);
        assert_eq!(curl(&["-x", &with, &plain_url], &[]), Ok("200".into()));
        assert_eq!(proxy.seen().last().unwrap(), &format!("GET {plain_url} HTTP/1.1"));
        let open = ForwardProxy::start(&[("reg.internal.test", "127.0.0.1")], None);
        assert_eq!(curl(&["-x", &open.url(), &plain_url], &[]), Ok("200".into()));
        assert!(open.auth_seen().is_empty());
    }

    #[test]
    fn curl_needs_a_client_certificate_of_the_right_ca_for_mutual_tls() {
        if !(crate::require("docker-registry") && crate::require("openssl") && crate::require("curl")) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path());
        let other = TestCa::new(dir.path());
        let (cert, key) = ca.server_cert(&["reg.internal.test"], &["127.0.0.1"]);
        let reg = Registry::start_tls(&cert, &key, Some(&ca.cert()));
        let resolve = format!("reg.internal.test:{}:127.0.0.1", reg.port);
        let url = format!("https://reg.internal.test:{}/v2/", reg.port);
        let cacert = ca.cert();
        let base = ["--cacert", cacert.to_str().unwrap(), "--resolve", &resolve, &url];
        // Under TLS 1.3 the refusal comes after the client's handshake is
        // done: curl often sees the connection reset, not the alert.
        assert!(curl(&base, &[]).is_err(), "no client certificate, yet accepted");
        let (c, k) = ca.client_cert("puller");
        assert_eq!(
            curl(&base, &[Path::new("--cert"), &c, Path::new("--key"), &k]),
            Ok("200".into())
        );
        let (c, k) = other.client_cert("stranger");
        assert!(
            curl(&base, &[Path::new("--cert"), &c, Path::new("--key"), &k]).is_err(),
            "a client certificate of another CA, yet accepted"
        );
    }
}
