//! gantry-transport-v2: the Docker Registry HTTP API v2 / OCI distribution
//! client, as a sandboxed component.
//!
//! It speaks the protocol — `/v2/` probe, token auth from the
//! `WWW-Authenticate` challenge, basic auth, manifest `Accept` headers,
//! ranged blob requests — over the host's `http` import. It trusts nothing
//! and is trusted with nothing: the host filters where it may connect, keeps
//! blob bodies on the host side, follows redirects without forwarding the
//! token, and verifies every digest this component reports. Written
//! against `gantry-kit`'s `Transport` trait.

use gantry_kit::transport::http::{send, send_body, send_bytes, Request, Response};
use gantry_kit::transport::{
    basic_auth, check_repository, header, read_all, resumed_body, ByteStream, Endpoint, Error, Manifest, Mounted,
    ProbeInfo, Resolved, Transport, Upload,
};
use std::cell::RefCell;
use std::collections::VecDeque;

const MAX_MANIFEST: usize = 4 << 20;

struct V2;

/// Whose `Authorization` a cached one is: the endpoint, the scope, and the
/// exact credentials that earned it (`None`: anonymous). A value is only
/// ever reused for the same three, so one client's token never answers for
/// another's credentials (the host also gives each credential set its own
/// instances; this holds even where it would not).
#[derive(PartialEq, Eq)]
struct AuthKey {
    endpoint: String,
    scope: String,
    credentials: Option<(String, String, Option<String>)>,
}

impl AuthKey {
    fn new(ep: &Endpoint, scope: &str) -> AuthKey {
        AuthKey {
            endpoint: ep.url.clone(),
            scope: scope.to_string(),
            credentials: ep
                .credentials
                .as_ref()
                .map(|c| (c.username.clone(), c.password.clone(), c.identity_token.clone())),
        }
    }

    fn bytes(&self, auth: &Option<String>) -> usize {
        let c = self
            .credentials
            .as_ref()
            .map_or(0, |(u, p, t)| u.len() + p.len() + t.as_ref().map_or(0, String::len));
        self.endpoint.len() + self.scope.len() + c + auth.as_ref().map_or(0, String::len) + 64
    }
}

/// The `Authorization` values that worked (`None` when none was needed),
/// oldest first. Scopes name repositories a client chose, so the cache is
/// bounded in entries and bytes and forgets the oldest.
#[derive(Default)]
struct AuthCache {
    entries: VecDeque<(AuthKey, Option<String>)>,
    bytes: usize,
}

const AUTH_ENTRIES: usize = 64;
const AUTH_BYTES: usize = 256 << 10;

impl AuthCache {
    fn get(&self, key: &AuthKey) -> Option<Option<String>> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn put(&mut self, key: AuthKey, auth: Option<String>) {
        if let Some(i) = self.entries.iter().position(|(k, _)| *k == key) {
            if let Some((k, v)) = self.entries.remove(i) {
                self.bytes -= k.bytes(&v);
            }
        }
        let size = key.bytes(&auth);
        if size > AUTH_BYTES / 4 {
            return;
        }
        while !self.entries.is_empty() && (self.entries.len() >= AUTH_ENTRIES || self.bytes + size > AUTH_BYTES) {
            if let Some((k, v)) = self.entries.pop_front() {
                self.bytes -= k.bytes(&v);
            }
        }
        self.bytes += size;
        self.entries.push_back((key, auth));
    }
}

thread_local! {
    static AUTH: RefCell<AuthCache> = RefCell::new(AuthCache::default());
}

/// The registry's own words from an `{"errors":[{"code","message"}]}` body.
fn registry_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let msgs: Vec<String> = v
        .get("errors")?
        .as_array()?
        .iter()
        .filter_map(|e| {
            e.get("message")
                .and_then(|m| m.as_str())
                .or_else(|| e.get("code").and_then(|c| c.as_str()))
        })
        .map(|m| m.to_lowercase())
        .collect();
    (!msgs.is_empty()).then(|| msgs.join("; "))
}

/// Maps an HTTP status that is not success to an error class.
fn status_error(status: u16, what: &str, body: &[u8]) -> Error {
    // The registry's words are untrusted: the host escapes them when shown.
    let detail = registry_message(body).unwrap_or_else(|| {
        String::from_utf8_lossy(&body[..body.len().min(200)])
            .trim()
            .replace('\n', " ")
    });
    let msg = match (status, detail.is_empty()) {
        (404, false) => format!("{what} not found: {detail}"),
        (404, true) => format!("{what} not found"),
        (401, false) => format!("{what}: unauthorized: {detail}"),
        (401, true) => format!("{what}: unauthorized"),
        (_, false) => format!("{what}: HTTP {status}: {detail}"),
        (_, true) => format!("{what}: HTTP {status}"),
    };
    match status {
        404 => Error::NotFound(msg),
        401 => Error::Unauthorized(msg),
        403 => Error::Denied(msg),
        405 | 501 => Error::Unsupported(msg),
        408 | 425 | 429 | 500..=599 => Error::Transient(msg),
        _ => Error::Internal(msg),
    }
}

/// Fetches a bearer token for `scope` from the challenge's realm.
fn fetch_token(ep: &Endpoint, params: &[(String, String)], scope: &str) -> Result<String, Error> {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let realm = get("realm").ok_or_else(|| Error::Unauthorized("token challenge has no realm".into()))?;
    let mut url = realm.to_string();
    let mut sep = if url.contains('?') { '&' } else { '?' };
    if let Some(service) = get("service") {
        url.push_str(&format!("{sep}service={}", gantry_kit::query_escape(service)));
        sep = '&';
    }
    // What this call needs (a push needs more than the challenge of its
    // first `HEAD` names); the challenge's own scope when it needs none.
    let scope = if scope.is_empty() {
        get("scope").unwrap_or("")
    } else {
        scope
    };
    for one in scope.split(' ').filter(|s| !s.is_empty()) {
        url.push_str(&format!("{sep}scope={}", gantry_kit::query_escape(one)));
        sep = '&';
    }
    let mut headers = Vec::new();
    if let Some(c) = &ep.credentials {
        headers.push(("authorization".to_string(), basic_auth(c)));
    }
    let resp = send(&Request {
        method: "GET".into(),
        url,
        headers,
    })?;
    let body = read_all(&resp.body, 1 << 20)?;
    if resp.status != 200 {
        return Err(match status_error(resp.status, "token server", &body) {
            Error::NotFound(m) | Error::Denied(m) => Error::Unauthorized(m),
            e => e,
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| Error::Unauthorized(format!("token server sent invalid JSON: {e}")))?;
    v.get("token")
        .or_else(|| v.get("access_token"))
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .ok_or_else(|| Error::Unauthorized("token server sent no token".into()))
}

/// Sends a request, answering one auth challenge if the registry makes one.
fn request(
    ep: &Endpoint,
    method: &str,
    url: String,
    headers: Vec<(String, String)>,
    scope: &str,
) -> Result<Response, Error> {
    let key = AuthKey::new(ep, scope);
    let cached = AUTH.with(|t| t.borrow().get(&key)).flatten();
    let with_auth = |auth: Option<String>| {
        let mut h = headers.clone();
        if let Some(a) = auth {
            h.push(("authorization".to_string(), a));
        }
        send(&Request {
            method: method.to_string(),
            url: url.clone(),
            headers: h,
        })
    };
    let resp = with_auth(cached.clone())?;
    if resp.status != 401 {
        remember(key, cached);
        return Ok(resp);
    }
    let challenge = header(&resp, "www-authenticate").unwrap_or("").to_string();
    let Some((scheme, params)) = gantry_kit::parse_challenge(&challenge) else {
        return Ok(resp);
    };
    let auth = if scheme.eq_ignore_ascii_case("bearer") {
        format!("Bearer {}", fetch_token(ep, &params, scope)?)
    } else if scheme.eq_ignore_ascii_case("basic") {
        match &ep.credentials {
            Some(c) => basic_auth(c),
            None => return Ok(resp),
        }
    } else {
        return Ok(resp);
    };
    let resp = with_auth(Some(auth.clone()))?;
    if resp.status != 401 {
        remember(key, Some(auth));
    }
    Ok(resp)
}

fn remember(key: AuthKey, auth: Option<String>) {
    AUTH.with(|t| t.borrow_mut().put(key, auth));
}

/// The `Authorization` value for `scope`, learnt (with a `GET` of `probe`,
/// answering its challenge) when not known yet: a request whose body is a
/// stream cannot be sent twice, so it must go out right the first time.
fn auth_for(ep: &Endpoint, probe: &str, scope: &str) -> Result<Option<String>, Error> {
    let key = AuthKey::new(ep, scope);
    if let Some(known) = AUTH.with(|t| t.borrow().get(&key)) {
        return Ok(known);
    }
    let resp = request(ep, "GET", probe.to_string(), Vec::new(), scope)?;
    let _ = read_all(&resp.body, 64 << 10);
    Ok(AUTH.with(|t| t.borrow().get(&key)).flatten())
}

fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

fn push_scope(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
}

/// An upload session's URL from a `Location` header: absolute, or a path
/// resolved against the endpoint.
fn location(ep: &Endpoint, resp: &Response, fallback: &str) -> Result<String, Error> {
    match header(resp, "location") {
        Some(l) if l.starts_with("https://") || l.starts_with("http://") => Ok(l.to_string()),
        Some(l) if l.starts_with('/') => Ok(format!("{}{l}", ep.url)),
        Some(_) => Err(Error::Invalid(
            "the registry sent an upload location that is not a URL".into(),
        )),
        None if !fallback.is_empty() => Ok(fallback.to_string()),
        None => Err(Error::Invalid("the registry sent no upload location".into())),
    }
}

/// How many bytes a session holds, from its `Range: 0-END` header
/// (`0-0` is how distribution says nothing yet).
fn held(resp: &Response) -> Option<u64> {
    let end = header(resp, "range")?
        .trim()
        .trim_start_matches("bytes=")
        .split('-')
        .nth(1)?;
    let end: u64 = end.trim().parse().ok()?;
    Some(if end == 0 { 0 } else { end + 1 })
}

fn fail(resp: Response, what: &str) -> Error {
    let body = read_all(&resp.body, 4096).unwrap_or_default();
    status_error(resp.status, what, &body)
}

fn check_reference(reference: &str) -> Result<(), Error> {
    if !reference.is_empty()
        && reference
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
    {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid reference {reference:?}")))
    }
}

impl Transport for V2 {
    fn probe(ep: Endpoint) -> Result<ProbeInfo, Error> {
        let resp = request(&ep, "GET", format!("{}/v2/", ep.url), Vec::new(), "")?;
        match resp.status {
            // With credentials, a probe is a login (`docker login`): the
            // challenge was answered with them, and a 401 is their refusal.
            401 if ep.credentials.is_some() => Err(Error::Unauthorized(format!(
                "login attempt to {}/v2/ failed with status: 401 Unauthorized",
                ep.url
            ))),
            200 | 401 => Ok(ProbeInfo { version: "v2".into() }),
            s => {
                let body = read_all(&resp.body, 4096).unwrap_or_default();
                Err(match status_error(s, "probing /v2/", &body) {
                    Error::NotFound(m) => Error::Unsupported(m),
                    e => e,
                })
            }
        }
    }

    fn resolve(ep: Endpoint, repository: String, reference: String, accept: Vec<String>) -> Result<Resolved, Error> {
        check_repository(&repository)?;
        check_reference(&reference)?;
        let url = format!("{}/v2/{}/manifests/{}", ep.url, repository, reference);
        let resp = request(
            &ep,
            "GET",
            url,
            vec![("accept".into(), accept.join(", "))],
            &pull_scope(&repository),
        )?;
        if let Some(len) = header(&resp, "content-length").and_then(|l| l.parse::<u64>().ok()) {
            if len > MAX_MANIFEST as u64 && resp.status == 200 {
                return Err(Error::Invalid("manifest is larger than 4 MiB".into()));
            }
        }
        let body = read_all(&resp.body, MAX_MANIFEST).map_err(|e| match e {
            Error::Invalid(_) => Error::Invalid("manifest is larger than 4 MiB".into()),
            e => e,
        })?;
        if resp.status != 200 {
            return Err(status_error(
                resp.status,
                &format!("manifest for {repository}:{reference}"),
                &body,
            ));
        }
        let media_type = header(&resp, "content-type")
            .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        Ok(Resolved::Manifest(Manifest {
            media_type,
            claimed_digest: header(&resp, "docker-content-digest").map(str::to_string),
            bytes: body,
        }))
    }

    fn open_blob(ep: Endpoint, repository: String, digest: String, offset: u64) -> Result<ByteStream, Error> {
        check_repository(&repository)?;
        check_reference(&digest)?;
        let url = format!("{}/v2/{}/blobs/{}", ep.url, repository, digest);
        let mut headers = Vec::new();
        if offset > 0 {
            headers.push(("range".into(), format!("bytes={offset}-")));
        }
        let resp = request(&ep, "GET", url, headers, &pull_scope(&repository))?;
        let what = format!("blob {digest}");
        match resumed_body(resp, offset, &what)? {
            Ok(body) => Ok(body),
            Err(resp) => {
                let body = read_all(&resp.body, 4096).unwrap_or_default();
                Err(status_error(resp.status, &what, &body))
            }
        }
    }

    fn list_tags(ep: Endpoint, repository: String) -> Result<Vec<String>, Error> {
        check_repository(&repository)?;
        let mut tags = Vec::new();
        let mut url = format!("{}/v2/{}/tags/list", ep.url, repository);
        for _ in 0..1000 {
            let resp = request(&ep, "GET", url.clone(), Vec::new(), &pull_scope(&repository))?;
            let body = read_all(&resp.body, 16 << 20)?;
            if resp.status != 200 {
                return Err(status_error(resp.status, &format!("tags of {repository}"), &body));
            }
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| Error::Invalid(format!("tag list is not valid JSON: {e}")))?;
            if let Some(list) = v.get("tags").and_then(|t| t.as_array()) {
                tags.extend(list.iter().filter_map(|t| t.as_str().map(str::to_string)));
            }
            // Follow `Link: </v2/...?n=..&last=..>; rel="next"`.
            match header(&resp, "link")
                .and_then(|l| l.split_once('<'))
                .and_then(|(_, r)| r.split_once('>'))
            {
                Some((next, _)) if next.starts_with('/') => url = format!("{}{}", ep.url, next),
                _ => return Ok(tags),
            }
        }
        Ok(tags)
    }

    fn stat_blob(ep: Endpoint, repository: String, digest: String) -> Result<Option<u64>, Error> {
        check_repository(&repository)?;
        check_reference(&digest)?;
        let url = format!("{}/v2/{}/blobs/{}", ep.url, repository, digest);
        let resp = request(&ep, "HEAD", url, Vec::new(), &push_scope(&repository))?;
        match resp.status {
            200 => Ok(Some(
                header(&resp, "content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0),
            )),
            404 => Ok(None),
            _ => Err(fail(resp, &format!("blob {digest}"))),
        }
    }

    fn mount_blob(ep: Endpoint, repository: String, digest: String, source: String) -> Result<Mounted, Error> {
        check_repository(&repository)?;
        check_repository(&source)?;
        check_reference(&digest)?;
        let url = format!(
            "{}/v2/{}/blobs/uploads/?mount={}&from={}",
            ep.url,
            repository,
            gantry_kit::query_escape(&digest),
            gantry_kit::query_escape(&source)
        );
        let scope = format!("{} repository:{source}:pull", push_scope(&repository));
        let resp = request(&ep, "POST", url, Vec::new(), &scope)?;
        match resp.status {
            201 => Ok(Mounted::Mounted),
            202 => Ok(Mounted::Upload(Upload {
                url: location(&ep, &resp, "")?,
                offset: 0,
            })),
            _ => Err(fail(resp, &format!("mounting blob {digest}"))),
        }
    }

    fn start_upload(ep: Endpoint, repository: String) -> Result<Upload, Error> {
        check_repository(&repository)?;
        let url = format!("{}/v2/{}/blobs/uploads/", ep.url, repository);
        let resp = request(&ep, "POST", url, Vec::new(), &push_scope(&repository))?;
        match resp.status {
            202 => Ok(Upload {
                url: location(&ep, &resp, "")?,
                offset: 0,
            }),
            _ => Err(fail(resp, &format!("starting an upload to {repository}"))),
        }
    }

    fn upload_status(ep: Endpoint, repository: String, url: String) -> Result<Upload, Error> {
        check_repository(&repository)?;
        let resp = request(&ep, "GET", url.clone(), Vec::new(), &push_scope(&repository))?;
        match resp.status {
            200 | 204 => Ok(Upload {
                url: location(&ep, &resp, &url)?,
                offset: held(&resp).unwrap_or(0),
            }),
            _ => Err(fail(resp, "upload session")),
        }
    }

    fn upload_chunk(
        ep: Endpoint,
        repository: String,
        session: Upload,
        body: &ByteStream,
        length: Option<u64>,
    ) -> Result<Upload, Error> {
        check_repository(&repository)?;
        let scope = push_scope(&repository);
        let mut headers = vec![("content-type".to_string(), "application/octet-stream".to_string())];
        if let Some(a) = auth_for(&ep, &session.url, &scope)? {
            headers.push(("authorization".into(), a));
        }
        if let Some(len) = length.filter(|l| *l > 0) {
            headers.push((
                "content-range".into(),
                format!("{}-{}", session.offset, session.offset + len - 1),
            ));
        }
        let req = Request {
            method: "PATCH".into(),
            url: session.url.clone(),
            headers,
        };
        let resp = send_body(&req, body, length)?;
        match resp.status {
            202 | 204 => {
                let offset = held(&resp)
                    .or(length.map(|l| session.offset + l))
                    .unwrap_or(session.offset);
                Ok(Upload {
                    url: location(&ep, &resp, &session.url)?,
                    offset,
                })
            }
            416 => Err(Error::Transient(
                "the registry holds a different part of the upload".into(),
            )),
            _ => Err(fail(resp, "uploading a chunk")),
        }
    }

    fn finish_upload(
        ep: Endpoint,
        repository: String,
        session: Upload,
        digest: String,
        body: Option<&ByteStream>,
        length: u64,
    ) -> Result<(), Error> {
        check_repository(&repository)?;
        check_reference(&digest)?;
        let sep = if session.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}digest={}", session.url, gantry_kit::query_escape(&digest));
        let scope = push_scope(&repository);
        let mut headers = vec![("content-type".to_string(), "application/octet-stream".to_string())];
        if let Some(a) = auth_for(&ep, &session.url, &scope)? {
            headers.push(("authorization".into(), a));
        }
        let req = Request {
            method: "PUT".into(),
            url,
            headers,
        };
        let resp = match body {
            Some(b) => send_body(&req, b, Some(length))?,
            None => send_bytes(&req, &[])?,
        };
        match resp.status {
            201 | 204 => Ok(()),
            _ => Err(fail(resp, &format!("finishing the upload of {digest}"))),
        }
    }

    fn put_manifest(ep: Endpoint, repository: String, reference: String, m: Manifest) -> Result<Option<String>, Error> {
        check_repository(&repository)?;
        check_reference(&reference)?;
        let url = format!("{}/v2/{}/manifests/{}", ep.url, repository, reference);
        let scope = push_scope(&repository);
        let mut headers = vec![("content-type".to_string(), m.media_type.clone())];
        if let Some(a) = auth_for(&ep, &format!("{}/v2/{}/tags/list", ep.url, repository), &scope)? {
            headers.push(("authorization".into(), a));
        }
        let resp = send_bytes(
            &Request {
                method: "PUT".into(),
                url,
                headers,
            },
            &m.bytes,
        )?;
        match resp.status {
            200..=202 => Ok(header(&resp, "docker-content-digest").map(str::to_string)),
            _ => Err(fail(resp, &format!("putting the manifest {repository}:{reference}"))),
        }
    }
}

gantry_kit::export_transport!(V2);
