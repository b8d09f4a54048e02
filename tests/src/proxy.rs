//! An HTTP proxy in front of a real registry that adds what the tests need:
//! token auth (a `/token` endpoint and `WWW-Authenticate: Bearer`
//! challenges), and faults per blob — a connection cut mid-body, wrong
//! bytes, a redirect to a second "CDN" origin that records whether a
//! registry token reached it (and every connection made to it), a token
//! realm on that origin, a blob announced as huge and sent without end.
//! It counts the blob requests it served.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Faults {
    /// Require a bearer token from `/token` (checked against these basic credentials if set).
    pub token_auth: bool,
    pub basic_user: Option<(String, String)>,
    /// Cut the body of this blob after N bytes, the first time it is served.
    pub cut_blob: Option<(String, usize)>,
    /// Send half of this blob, then hang without closing (for kill tests).
    pub stall_blob: Option<String>,
    /// Wait this long before answering for this blob.
    pub delay_blob: Option<(String, std::time::Duration)>,
    /// Forward blob requests without their `Range` header: a registry that
    /// cannot resume (answers 200 with the whole blob).
    pub ignore_range: bool,
    /// Serve this blob with one byte changed.
    pub corrupt_blob: Option<String>,
    /// Answer every blob request with a redirect to the CDN origin.
    pub redirect_blobs: bool,
    /// The host the CDN listens on (default the registry's own, 127.0.0.1,
    /// on another port: another origin on the same machine). Another
    /// loopback address plays an internal service the registry points at.
    pub cdn_host: Option<String>,
    /// Redirect blobs to this base URL (`scheme://host[:port]`) instead of
    /// the CDN listener: an address nothing here listens on.
    pub redirect_to: Option<String>,
    /// With `token_auth`: the challenge names a realm on the CDN origin.
    pub realm_on_cdn: bool,
    /// Answer a GET of this blob with a `Content-Length` of this many
    /// bytes and send zeros until the connection goes.
    pub endless_blob: Option<(String, u64)>,
    /// Serve manifests with this `Content-Type` instead of their own.
    pub manifest_content_type: Option<String>,
    /// Answer every manifest request with this status.
    pub manifest_status: Option<u16>,
    /// Serve manifests padded to this many bytes.
    pub huge_manifest: Option<usize>,
    /// Answer manifest requests with this status and this raw body.
    pub manifest_error_body: Option<(u16, Vec<u8>)>,
    /// Serve image manifests with `"manifests": []` added (CVE-2021-41190).
    pub ambiguous_manifest: bool,
    /// Answer 404 to everything under `/v2` (a registry that speaks only v1).
    pub no_v2: bool,
    /// Add one to every `X-Docker-Size` (a v1 registry lying about layer sizes).
    pub lie_docker_size: bool,
}

#[derive(Default)]
pub struct Seen {
    /// Blob GETs served, by digest (range requests included).
    pub blob_gets: HashMap<String, usize>,
    pub range_requests: usize,
    pub tokens_issued: usize,
    /// Authorization headers that reached the CDN origin.
    pub cdn_authorization: Vec<String>,
    pub cdn_gets: usize,
    /// Connections accepted by the CDN listener, requests or not.
    pub cdn_connections: usize,
    /// Bytes of the endless blob written so far, and whether its
    /// connection was closed by the other side.
    pub endless_sent: u64,
    pub endless_closed: bool,
    /// Every request the proxy read.
    pub requests: usize,
}

pub struct Proxy {
    pub port: u16,
    pub cdn_port: u16,
    cdn_host: String,
    pub seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

#[derive(Clone)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_req(s: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut line = String::new();
    s.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        s.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Some(Req { method, path, headers })
}

fn respond(s: &mut TcpStream, status: u16, headers: &[(String, String)], body: &[u8]) {
    let mut out = format!("HTTP/1.1 {status} X\r\n");
    for (k, v) in headers {
        if !k.eq_ignore_ascii_case("content-length") && !k.eq_ignore_ascii_case("connection") {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()));
    let _ = s.write_all(out.as_bytes());
    let _ = s.write_all(body);
}

/// Forwards a GET/HEAD to the upstream registry; returns status, headers, body.
fn forward(upstream: u16, req: &Req) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut u = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
    let mut out = format!(
        "{} {} HTTP/1.1\r\nHost: 127.0.0.1:{upstream}\r\nConnection: close\r\n",
        req.method, req.path
    );
    for (k, v) in &req.headers {
        let k_l = k.to_ascii_lowercase();
        if !matches!(k_l.as_str(), "host" | "connection" | "authorization") {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str("\r\n");
    u.write_all(out.as_bytes()).unwrap();
    let mut r = BufReader::new(u);
    let mut status_line = String::new();
    r.read_line(&mut status_line).unwrap();
    let status: u16 = status_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut body = Vec::new();
    if req.method != "HEAD" {
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok());
        match len {
            Some(n) => {
                body.resize(n, 0);
                r.read_exact(&mut body).unwrap();
            }
            None => {
                r.read_to_end(&mut body).unwrap();
            }
        }
    }
    (status, headers, body)
}

fn blob_digest(path: &str) -> Option<String> {
    let i = path.find("/blobs/")?;
    Some(path[i + 7..].split('?').next()?.to_string())
}

impl Proxy {
    /// A proxy in front of `upstream` that asks for token auth and gives
    /// tokens to alice (password `s3cret`) alone.
    pub fn alice_only(upstream: u16) -> Proxy {
        Proxy::start(
            upstream,
            Faults {
                token_auth: true,
                basic_user: Some(("alice".into(), "s3cret".into())),
                ..Default::default()
            },
        )
    }

    pub fn start(upstream: u16, faults: Faults) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let cdn_host = faults.cdn_host.clone().unwrap_or_else(|| "127.0.0.1".into());
        let cdn = TcpListener::bind((cdn_host.as_str(), 0)).unwrap();
        let cdn_port = cdn.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(faults);
        let cut_done = Arc::new(AtomicBool::new(false));
        {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                for s in cdn.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(s) = s else { continue };
                    seen.lock().unwrap().cdn_connections += 1;
                    let seen = seen.clone();
                    std::thread::spawn(move || {
                        let mut r = BufReader::new(s.try_clone().unwrap());
                        let Some(mut req) = read_req(&mut r) else {
                            return;
                        };
                        {
                            let mut g = seen.lock().unwrap();
                            g.cdn_gets += 1;
                            if let Some(a) = req.header("authorization") {
                                g.cdn_authorization.push(a.to_string());
                            }
                        }
                        req.path = req.path.replacen("/cdn", "", 1);
                        let (st, h, b) = forward(upstream, &req);
                        respond(&mut s.try_clone().unwrap(), st, &h, &b);
                    });
                }
            });
        }
        {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                for s in l.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(s) = s else { continue };
                    let (seen, faults, cut_done) = (seen.clone(), faults.clone(), cut_done.clone());
                    let cdn = format!("{}:{cdn_port}", faults.cdn_host.as_deref().unwrap_or("127.0.0.1"));
                    std::thread::spawn(move || serve(s, port, &cdn, upstream, &faults, &seen, &cut_done));
                }
            });
        }
        crate::registry::wait_for(&format!("127.0.0.1:{port}"));
        Proxy {
            port,
            cdn_port,
            cdn_host,
            seen,
            stop,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn serve(
    s: TcpStream,
    port: u16,
    cdn: &str,
    upstream: u16,
    faults: &Faults,
    seen: &Mutex<Seen>,
    cut_done: &AtomicBool,
) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let Some(req) = read_req(&mut r) else { return };
    seen.lock().unwrap().requests += 1;
    if req.path.starts_with("/token") {
        if let Some((u, p)) = &faults.basic_user {
            use base64::Engine as _;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            );
            if req.header("authorization") != Some(want.as_str()) {
                respond(&mut w, 401, &[], b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}");
                return;
            }
        }
        let n = {
            let mut g = seen.lock().unwrap();
            g.tokens_issued += 1;
            g.tokens_issued
        };
        respond(
            &mut w,
            200,
            &[("Content-Type".into(), "application/json".into())],
            format!("{{\"token\":\"tok-{n}\"}}").as_bytes(),
        );
        return;
    }
    if faults.token_auth
        && !req
            .header("authorization")
            .is_some_and(|a| a.starts_with("Bearer tok-"))
    {
        let realm = if faults.realm_on_cdn {
            format!("http://{cdn}/token")
        } else {
            format!("http://127.0.0.1:{port}/token")
        };
        let challenge = format!("Bearer realm=\"{realm}\",service=\"gantry-test\"");
        respond(
            &mut w,
            401,
            &[
                ("WWW-Authenticate".into(), challenge),
                ("Content-Type".into(), "application/json".into()),
            ],
            b"{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"authentication required\"}]}",
        );
        return;
    }
    if faults.no_v2 && (req.path == "/v2" || req.path.starts_with("/v2/")) {
        respond(&mut w, 404, &[], b"404 page not found\n");
        return;
    }
    if req.path.contains("/manifests/") {
        if let Some(st) = faults.manifest_status {
            respond(&mut w, st, &[], b"{\"errors\":[{\"code\":\"INJECTED\"}]}");
            return;
        }
        if let Some((st, body)) = &faults.manifest_error_body {
            respond(&mut w, *st, &[], body);
            return;
        }
    }
    let digest = blob_digest(&req.path);
    if let Some(d) = &digest {
        let mut g = seen.lock().unwrap();
        *g.blob_gets.entry(d.clone()).or_default() += 1;
        if req.header("range").is_some() {
            g.range_requests += 1;
        }
        drop(g);
        if let Some((slow, wait)) = &faults.delay_blob {
            if slow == d {
                std::thread::sleep(*wait);
            }
        }
        if let Some((endless, announced)) = &faults.endless_blob {
            if endless == d && req.method == "GET" {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {announced}\r\nContent-Type: application/octet-stream\r\nDocker-Content-Digest: {d}\r\n\r\n");
                if w.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let zeros = vec![0u8; 64 << 10];
                loop {
                    if w.write_all(&zeros).is_err() {
                        seen.lock().unwrap().endless_closed = true;
                        return;
                    }
                    seen.lock().unwrap().endless_sent += zeros.len() as u64;
                }
            }
        }
        if faults.redirect_blobs || faults.redirect_to.is_some() {
            // Like a presigned URL: the signature is a secret of the query.
            let base = faults.redirect_to.clone().unwrap_or_else(|| format!("http://{cdn}"));
            let loc = format!("{base}/cdn{}?X-Amz-Signature=s3cret-signature", req.path);
            respond(&mut w, 307, &[("Location".into(), loc)], b"");
            return;
        }
    }
    let (status, mut headers, mut body) = if faults.ignore_range {
        let mut plain = req.clone();
        plain.headers.retain(|(k, _)| !k.eq_ignore_ascii_case("range"));
        forward(upstream, &plain)
    } else {
        forward(upstream, &req)
    };
    if faults.lie_docker_size {
        for (k, v) in headers.iter_mut() {
            if k.eq_ignore_ascii_case("x-docker-size") {
                if let Ok(n) = v.trim().parse::<u64>() {
                    *v = (n + 1).to_string();
                }
            }
        }
    }
    if faults.ambiguous_manifest && req.path.contains("/manifests/") {
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) {
            if v.get("layers").is_some() {
                v["manifests"] = serde_json::json!([]);
                body = v.to_string().into_bytes();
                headers.retain(|(k, _)| !k.eq_ignore_ascii_case("docker-content-digest"));
            }
        }
    }
    if let Some(t) = &faults.manifest_content_type {
        if req.path.contains("/manifests/") {
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case("content-type"));
            headers.push(("Content-Type".into(), t.clone()));
        }
    }
    if let Some(n) = faults.huge_manifest {
        if req.path.contains("/manifests/") {
            body.resize(n, b' ');
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case("docker-content-digest"));
        }
    }
    if let Some(d) = &digest {
        if faults.corrupt_blob.as_deref() == Some(d.as_str()) && !body.is_empty() {
            let i = body.len() / 2;
            body[i] ^= 0xff;
        }
        if faults.stall_blob.as_deref() == Some(d.as_str()) {
            let mut out = format!("HTTP/1.1 {status} X\r\n");
            for (k, v) in &headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            let _ = w.write_all(out.as_bytes());
            let _ = w.write_all(&body[..body.len() / 2]);
            let _ = w.flush();
            std::thread::sleep(std::time::Duration::from_secs(60));
            return;
        }
        if let Some((cut, after)) = &faults.cut_blob {
            if cut == d && !cut_done.swap(true, Ordering::SeqCst) {
                // Promise the whole body, send part of it, hang up.
                let mut out = format!("HTTP/1.1 {status} X\r\n");
                for (k, v) in &headers {
                    if !k.eq_ignore_ascii_case("connection") {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                }
                out.push_str("Connection: close\r\n\r\n");
                let _ = w.write_all(out.as_bytes());
                let _ = w.write_all(&body[..(*after).min(body.len())]);
                let _ = w.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
    respond(&mut w, status, &headers, &body);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let _ = TcpStream::connect((self.cdn_host.as_str(), self.cdn_port));
    }
}
