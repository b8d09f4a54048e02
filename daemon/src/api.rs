//! The Engine API routes: version negotiation (`/_ping`, `/version`, an
//! optional `/v1.NN` prefix), the image routes an [`Engine`] answers
//! (with `/distribution/{name}/json` and `/system/df`, which speak of
//! images), a 501 with Docker's error JSON (`{"message": …}`) for the
//! Engine API's routes this daemon does not serve (containers, volumes…)
//! and dockerd's 404 `page not found` for any other path — never a hang,
//! and never a broken pipe for a client still sending a body: a refused
//! request's body is read (up to a bound) before the answer goes.

use bytes::Bytes;
use gantry_core::images::{DiskUsage, Summary};
use gantry_core::pull::Distribution;
use gantry_core::text::escape_line;
use gantry_http::body::{ChannelBody, Chunk};
use gantry_http::query::{self, percent_decode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Why an engine call failed; the status Docker gives each.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    /// Not allowed here (a registry outside a tenant's allow-list).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    fn status(&self) -> StatusCode {
        match self {
            EngineError::NotFound(_) => StatusCode::NOT_FOUND,
            EngineError::Invalid(_) => StatusCode::BAD_REQUEST,
            EngineError::Conflict(_) => StatusCode::CONFLICT,
            EngineError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            EngineError::Forbidden(_) => StatusCode::FORBIDDEN,
            EngineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One image in Docker's `GET /images/json` shape (what its filters and
/// prune's read, too).
fn summary_json(s: &Summary) -> Value {
    let (tags, digests) = s.repo_names();
    json!({
        "Id": s.id.to_string(),
        "ParentId": "",
        "RepoTags": tags,
        "RepoDigests": digests,
        "Created": s.created,
        "Size": s.size,
        "SharedSize": -1,
        "VirtualSize": s.size,
        // dockerd's `null` for an image without labels.
        "Labels": if s.labels.is_empty() { Value::Null } else { Value::Object(s.labels.clone()) },
        "Containers": -1,
    })
}

/// An image summary as `GET /system/df` (and `/images/json?shared-size=1`)
/// gives it: the bytes it shares with other images, and how many
/// containers use it (none: gantry runs none).
fn summary_with_usage(s: &Summary, shared: u64) -> Value {
    let mut v = summary_json(s);
    v["SharedSize"] = json!(shared);
    v["Containers"] = json!(0);
    v
}

/// Docker's `DistributionInspect`: the manifest's descriptor and the
/// platforms offered, in the OCI spec's keys (the optional ones only when
/// present, as Go's `omitempty` writes them — the SDK compares whole
/// dictionaries).
fn distribution_json(d: &Distribution) -> Value {
    let platforms: Vec<Value> = d
        .platforms
        .iter()
        .map(|p| {
            let mut v = json!({"architecture": p.architecture, "os": p.os});
            if let Some(x) = &p.os_version {
                v["os.version"] = json!(x);
            }
            if !p.os_features.is_empty() {
                v["os.features"] = json!(p.os_features);
            }
            if let Some(x) = &p.variant {
                v["variant"] = json!(x);
            }
            v
        })
        .collect();
    json!({
        "Descriptor": {"mediaType": d.media_type, "digest": d.digest.to_string(), "size": d.size},
        "Platforms": platforms,
    })
}

/// Credentials a client sent in `X-Registry-Auth`.
#[derive(Debug, Clone, Default)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
    pub identity_token: Option<String>,
}

/// What the daemon's image routes call: the binary implements it over the
/// same core pipelines as the CLI. Every method may block.
pub trait Engine: Send + Sync + 'static {
    /// `GET /images/json`: every image's summary (rendered here in
    /// Docker's shape).
    fn list(&self) -> Result<Vec<Summary>, EngineError>;
    /// `GET /system/df` (and `/images/json?shared-size=1`): each image's
    /// summary with its shared size, and the layers' total.
    fn disk_usage(&self) -> Result<DiskUsage, EngineError>;
    /// `GET /distribution/{name}/json`: what `reference` resolves to at its
    /// registry (with the client's credentials, within the allow-list),
    /// without pulling it.
    fn distribution(&self, reference: &str, auth: Option<RegistryAuth>) -> Result<Distribution, EngineError>;
    /// `GET /info`: what this daemon's store holds and runs on, in Docker's
    /// `system info` keys (`Images`, `Driver`, `DockerRootDir`, …).
    fn info(&self) -> Result<Value, EngineError>;
    /// `GET /images/{name}/json`.
    fn inspect(&self, name: &str) -> Result<Value, EngineError>;
    /// `GET /images/{name}/history`.
    fn history(&self, name: &str) -> Result<Value, EngineError>;
    /// `POST /images/{name}/tag`.
    fn tag(&self, name: &str, target: &str) -> Result<(), EngineError>;
    /// `DELETE /images/{name}`: what was untagged and deleted, as Docker's
    /// `[{"Untagged": …}, {"Deleted": …}]`.
    fn remove(&self, name: &str, force: bool) -> Result<Vec<Value>, EngineError>;
    /// Whether `reference` is a valid image reference of a registry this
    /// store may use (checked before a pull or push starts streaming, so a
    /// bad one is a plain 400, a forbidden one a 403).
    fn valid_reference(&self, reference: &str) -> Result<(), EngineError>;
    /// `POST /images/create?fromImage=`: pulls `reference`, reporting
    /// Docker's progress messages to `progress`; `cancel` is set when the
    /// client goes away.
    fn pull(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
        progress: &(dyn Fn(Value) + Sync),
        cancel: Arc<AtomicBool>,
    ) -> Result<(), EngineError>;
    /// `POST /images/{name}/push`: pushes a tag, with Docker's messages.
    fn push(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
        progress: &(dyn Fn(Value) + Sync),
    ) -> Result<(), EngineError>;
    /// `GET /images/get`: a `docker save` archive of `names` into `out`.
    fn save(&self, names: &[String], out: &mut dyn std::io::Write) -> Result<(), EngineError>;
    /// `POST /images/load`: loads an archive read from `input`.
    fn load(&self, input: &mut dyn std::io::Read, progress: &(dyn Fn(Value) + Sync)) -> Result<(), EngineError>;
    /// `POST /images/prune`: removes the images `select` picks (given each
    /// image's summary, as `list` makes it); Docker's
    /// `{"ImagesDeleted": […], "SpaceReclaimed": N}`.
    fn prune(&self, select: &(dyn Fn(&Summary) -> bool + Sync)) -> Result<Value, EngineError>;
    /// `POST /auth`: checks credentials against a registry as `docker
    /// login` asks (the client stores them; the daemon keeps nothing).
    fn auth(&self, server: &str, auth: RegistryAuth) -> Result<(), EngineError>;
    /// Whether an import's arguments are good (checked before its body is
    /// read, so a bad one is a plain 400).
    fn check_import(&self, request: &ImportRequest) -> Result<(), EngineError>;
    /// `POST /images/create?fromSrc=-`: an image from the root filesystem
    /// tarball read from `input`; reports its ID as Docker does.
    fn import(
        &self,
        request: &ImportRequest,
        input: &mut (dyn std::io::Read + Send),
        progress: &(dyn Fn(Value) + Sync),
    ) -> Result<(), EngineError>;
}

/// An import's arguments: `repo` (with `tag`), `message`, `changes`,
/// `platform`.
#[derive(Debug, Clone, Default)]
pub struct ImportRequest {
    pub reference: Option<String>,
    pub message: Option<String>,
    pub changes: Vec<String>,
    pub platform: Option<String>,
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).expect("serialisable")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Docker's error JSON. Messages may quote untrusted text (archive
/// contents, registry answers) and end on a client's terminal: escaped.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json!({ "message": escape_line(message) }))
}

/// The path without an API-version prefix, or the message a client with
/// an unsupported version gets (a 400).
fn strip_version(path: &str) -> Result<&str, String> {
    let Some(rest) = path.strip_prefix("/v") else {
        return Ok(path);
    };
    let Some((version, _)) = rest.split_once('/') else {
        return Ok(path);
    };
    let parse = |v: &str| -> Option<(u32, u32)> {
        let (a, b) = v.split_once('.')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let Some(v) = parse(version) else { return Ok(path) };
    let max = parse(crate::API_VERSION).expect("valid");
    let min = parse(crate::MIN_API_VERSION).expect("valid");
    if v > max {
        return Err(format!(
            "client version {version} is too new. Maximum supported API version is {}",
            crate::API_VERSION
        ));
    }
    if v < min {
        return Err(format!(
            "client version {version} is too old. Minimum supported API version is {}, please upgrade your client to a newer version",
            crate::MIN_API_VERSION
        ));
    }
    Ok(&path[2 + version.len()..])
}

/// `name` with the request's `tag` parameter, when it has one (`name:tag`).
fn with_tag(req: &Request<hyper::body::Incoming>, name: String) -> String {
    match query::param(req, "tag").filter(|t| !t.is_empty()) {
        Some(t) => format!("{name}:{t}"),
        None => name,
    }
}

fn truthy(v: Option<String>) -> bool {
    matches!(v.as_deref(), Some("1" | "true" | "True"))
}

/// `X-Registry-Auth`: base64url JSON, as the CLI encodes it; `None` when
/// the client sent none (or an empty `{}`, as the CLI does for anonymous
/// access). A header that cannot be read is the client's error (400): a
/// call never goes ahead as if the client had sent no credentials.
fn registry_auth(req: &Request<hyper::body::Incoming>) -> Result<Option<RegistryAuth>, &'static str> {
    use base64::Engine as _;
    let Some(header) = req.headers().get("x-registry-auth") else {
        return Ok(None);
    };
    let bad = || "invalid X-Registry-Auth header: not base64-encoded JSON";
    let raw = header.to_str().map_err(|_| bad())?.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw.trim_end_matches('='))
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(raw))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if !v.is_object() {
        return Err(bad());
    }
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let auth = RegistryAuth {
        username: s("username"),
        password: s("password"),
        identity_token: Some(s("identitytoken")).filter(|t| !t.is_empty()),
    };
    Ok((!auth.username.is_empty() || auth.identity_token.is_some()).then_some(auth))
}

/// The `filters` of `GET /images/json`: Docker's JSON map of lists.
#[derive(Debug, Default)]
struct Filters {
    /// `reference`: patterns (`*`, `?`) matched against `name` and `name:tag`.
    reference: Vec<String>,
    dangling: Option<bool>,
    /// `label`: `key` or `key=value`.
    label: Vec<String>,
}

/// Docker's `filters` parameter: a JSON map from a filter's name to its
/// values, either `["a", "b"]` or `{"a": true}` (older clients).
fn filter_lists(s: &str) -> Result<Vec<(String, Vec<String>)>, String> {
    let v: Value = serde_json::from_str(s).map_err(|e| format!("invalid filters: {e}"))?;
    let map = v.as_object().ok_or("invalid filters: not a JSON object")?;
    map.iter()
        .map(|(k, vals)| match vals {
            Value::Array(a) => Ok((
                k.clone(),
                a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
            )),
            Value::Object(o) => Ok((k.clone(), o.keys().cloned().collect())),
            _ => Err(format!("invalid filter {k:?}")),
        })
        .collect()
}

impl Filters {
    fn parse(s: &str) -> Result<Filters, String> {
        let mut f = Filters::default();
        for (k, list) in filter_lists(s)? {
            match k.as_str() {
                "reference" => f.reference = list,
                "label" => f.label = list,
                "dangling" => {
                    f.dangling = match list.first().map(String::as_str) {
                        Some("true" | "1") => Some(true),
                        Some("false" | "0") => Some(false),
                        _ => return Err("invalid filter 'dangling': true or false".into()),
                    }
                }
                other => return Err(format!("invalid filter '{other}'")),
            }
        }
        Ok(f)
    }

    /// The image as the filtered list shows it, or `None` when it is left
    /// out. A `reference` filter also narrows `RepoTags` and `RepoDigests`
    /// to what it matched, as dockerd does (`docker images REPO` lists only
    /// REPO).
    fn apply(&self, mut image: Value) -> Option<Value> {
        if !self.keep(&image) {
            return None;
        }
        if !self.reference.is_empty() {
            let matched: Vec<Value> = self
                .tags(&image)
                .into_iter()
                .filter(|t| self.matches(t))
                .map(|t| Value::String(t.to_string()))
                .collect();
            image["RepoTags"] = Value::Array(matched);
            // `name@sha256:…`: kept when its name matches.
            let digests: Vec<Value> = image["RepoDigests"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|d| {
                            let name = d.as_str().and_then(|d| d.split_once('@')).map(|(n, _)| n).unwrap_or("");
                            self.reference.iter().any(|p| glob(p, name))
                        })
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            image["RepoDigests"] = Value::Array(digests);
        }
        Some(image)
    }

    fn tags<'v>(&self, image: &'v Value) -> Vec<&'v str> {
        image["RepoTags"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
            .unwrap_or_default()
    }

    fn matches(&self, tag: &str) -> bool {
        let name = tag.rsplit_once(':').map(|(n, _)| n).unwrap_or(tag);
        self.reference.iter().any(|p| glob(p, tag) || glob(p, name))
    }

    fn keep(&self, image: &Value) -> bool {
        let tags = self.tags(image);
        if let Some(d) = self.dangling {
            if tags.is_empty() != d {
                return false;
            }
        }
        if !self.reference.is_empty() && !tags.iter().any(|t| self.matches(t)) {
            return false;
        }
        self.label.iter().all(|l| {
            let (k, v) = l.split_once('=').map(|(k, v)| (k, Some(v))).unwrap_or((l, None));
            match image["Labels"].get(k) {
                Some(have) => v.is_none_or(|v| have.as_str() == Some(v)),
                None => false,
            }
        })
    }
}

/// The `filters` of `POST /images/prune`: `dangling` (`false`: every
/// image, tagged or not, as `docker image prune -a` asks), `until` (a Unix
/// time, an RFC 3339 time or a duration before now), `label` and `label!`.
#[derive(Debug, Default)]
struct PruneFilters {
    all: bool,
    until: Option<i64>,
    label: Vec<String>,
    not_label: Vec<String>,
}

impl PruneFilters {
    fn parse(s: &str, now: i64) -> Result<PruneFilters, String> {
        let mut f = PruneFilters::default();
        for (k, list) in filter_lists(s)? {
            match k.as_str() {
                "dangling" => {
                    f.all = match list.first().map(String::as_str) {
                        Some("true" | "1") | None => false,
                        Some("false" | "0") => true,
                        Some(other) => return Err(format!("invalid filter 'dangling={}'", other.escape_default())),
                    }
                }
                "until" => {
                    let [t] = list.as_slice() else {
                        return Err("invalid filter 'until': give one time".into());
                    };
                    f.until =
                        Some(until(t, now).ok_or_else(|| format!("invalid filter 'until={}'", t.escape_default()))?);
                }
                "label" => f.label = list,
                "label!" => f.not_label = list,
                other => return Err(format!("invalid filter '{}'", other.escape_default())),
            }
        }
        Ok(f)
    }

    fn selects(&self, image: &Value) -> bool {
        let tagged = image["RepoTags"].as_array().is_some_and(|t| !t.is_empty());
        if tagged && !self.all {
            return false;
        }
        if let Some(until) = self.until {
            if image["Created"].as_i64().is_none_or(|c| c >= until) {
                return false;
            }
        }
        let has = |l: &String| {
            let (k, v) = l.split_once('=').map(|(k, v)| (k, Some(v))).unwrap_or((l, None));
            image["Labels"]
                .get(k)
                .is_some_and(|have| v.is_none_or(|v| have.as_str() == Some(v)))
        };
        self.label.iter().all(has) && !self.not_label.iter().any(has)
    }
}

/// An `until` filter's time: Unix seconds, RFC 3339, or a Go duration
/// (`24h`, `1h30m`) before `now`.
fn until(t: &str, now: i64) -> Option<i64> {
    if let Ok(secs) = t.split('.').next().unwrap_or(t).parse::<i64>() {
        return Some(secs);
    }
    if let Some(secs) = gantry_core::date::parse_rfc3339(t) {
        return Some(secs);
    }
    // A Go duration before now.
    let nanos = gantry_core::changes::go_duration(t)?;
    Some(now - nanos / 1_000_000_000)
}

/// Shell-style matching of `*` (not across `/`) and `?`, as Docker
/// matches `reference` filters.
fn glob(pattern: &str, s: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], s) || (!s.is_empty() && s[0] != b'/' && go(p, &s[1..])),
            (Some(b'?'), Some(c)) if *c != b'/' => go(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &s[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), s.as_bytes())
}

/// Runs a blocking engine call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(EngineError::Internal(format!("the request failed: {e}"))))
}

fn answer<T>(r: Result<T, EngineError>, ok: impl FnOnce(T) -> Response<Body>) -> Response<Body> {
    match r {
        Ok(v) => ok(v),
        Err(e) => error(e.status(), &e.to_string()),
    }
}

/// Answers one request.
pub async fn handle(engine: Arc<dyn Engine>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let raw_path = req.uri().path().to_string();
    let path = match strip_version(&raw_path) {
        Ok(p) => p.to_string(),
        Err(message) => return refuse(req, StatusCode::BAD_REQUEST, &message).await,
    };
    let method = req.method().clone();
    let mut resp = route(engine, &method, &path, req).await;
    let h = resp.headers_mut();
    h.insert("Api-Version", HeaderValue::from_static(crate::API_VERSION));
    h.insert("Docker-Experimental", HeaderValue::from_static("false"));
    h.insert("Ostype", HeaderValue::from_static("linux"));
    h.insert(
        "Server",
        HeaderValue::from_static(concat!("gantry/", env!("CARGO_PKG_VERSION"))),
    );
    resp
}

async fn route(
    engine: Arc<dyn Engine>,
    method: &Method,
    path: &str,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/_ping") => {
            let mut r = Response::new(if method == Method::HEAD { full("") } else { full("OK") });
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            r.headers_mut().insert(
                "Cache-Control",
                HeaderValue::from_static("no-cache, no-store, must-revalidate"),
            );
            return r;
        }
        (&Method::GET, "/version") => return json_response(StatusCode::OK, &version_json()),
        (&Method::GET, "/info") => {
            return answer(blocking(move || engine.info()).await, |mut v| {
                v["ServerVersion"] = json!(env!("CARGO_PKG_VERSION"));
                v["OSType"] = json!("linux");
                // dockerd's `Architecture` is the kernel's name (`x86_64`),
                // unlike `/version`'s `Arch` (Go's `amd64`).
                v["Architecture"] = json!(std::env::consts::ARCH);
                v["Containers"] = json!(0);
                v["ContainersRunning"] = json!(0);
                v["ContainersPaused"] = json!(0);
                v["ContainersStopped"] = json!(0);
                v["IndexServerAddress"] = json!("https://index.docker.io/v1/");
                // What `docker info` prints as `Experimental:`, `Debug
                // Mode:` and `Swarm:`.
                v["ExperimentalBuild"] = json!(false);
                v["Debug"] = json!(false);
                v["LiveRestoreEnabled"] = json!(false);
                v["Swarm"] = json!({
                    "NodeID": "", "NodeAddr": "", "LocalNodeState": "inactive",
                    "ControlAvailable": false, "Error": "", "RemoteManagers": null,
                });
                json_response(StatusCode::OK, &v)
            });
        }
        (&Method::GET, "/images/json") => {
            let filters = match query::param(&req, "filters").map(|f| Filters::parse(&f)).transpose() {
                Ok(f) => f.unwrap_or_default(),
                Err(m) => return error(StatusCode::BAD_REQUEST, &m),
            };
            // API 1.42's `shared-size`: each image's `SharedSize` counted
            // (else -1, as dockerd leaves it).
            if truthy(query::param(&req, "shared-size")) {
                return answer(blocking(move || engine.disk_usage()).await, |du| {
                    let images = du
                        .images
                        .iter()
                        .filter_map(|(s, shared)| {
                            let mut v = filters.apply(summary_json(s))?;
                            v["SharedSize"] = json!(shared);
                            Some(v)
                        })
                        .collect();
                    json_response(StatusCode::OK, &Value::Array(images))
                });
            }
            return answer(blocking(move || engine.list()).await, |v| {
                json_response(
                    StatusCode::OK,
                    &Value::Array(v.iter().map(summary_json).filter_map(|i| filters.apply(i)).collect()),
                )
            });
        }
        (&Method::GET, "/system/df") => return system_df(engine, &req).await,
        (&Method::POST, "/images/create") => return create(engine, req).await,
        (&Method::POST, "/auth") => return auth(engine, req).await,
        (&Method::POST, "/images/load") => return load(engine, req).await,
        (&Method::GET, "/images/get") => {
            let names = query::params(&req, "names");
            return save(engine, names);
        }
        (&Method::POST, "/images/prune") => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let filters = match query::param(&req, "filters")
                .map(|f| PruneFilters::parse(&f, now))
                .transpose()
            {
                Ok(f) => f.unwrap_or_default(),
                Err(m) => return error(StatusCode::BAD_REQUEST, &m),
            };
            return answer(
                blocking(move || engine.prune(&|image| filters.selects(&summary_json(image)))).await,
                |v| json_response(StatusCode::OK, &v),
            );
        }
        (&Method::GET, "/images/search") => {
            return refuse(
                req,
                StatusCode::NOT_IMPLEMENTED,
                "searching a registry is not supported: gantry keeps no index of Docker Hub",
            )
            .await;
        }
        _ => {}
    }
    if let Some(name) = path
        .strip_prefix("/distribution/")
        .and_then(|p| p.strip_suffix("/json"))
    {
        if *method == Method::GET {
            return distribution(engine, percent_decode(name).into_owned(), &req).await;
        }
    }
    if let Some(rest) = path.strip_prefix("/images/") {
        let name_of = |suffix: &str| rest.strip_suffix(suffix).map(|n| percent_decode(n).into_owned());
        match *method {
            Method::GET => {
                if let Some(name) = name_of("/get") {
                    return save(engine, vec![name]);
                }
                if let Some(name) = name_of("/json") {
                    return answer(blocking(move || engine.inspect(&name)).await, |v| {
                        json_response(StatusCode::OK, &v)
                    });
                }
                if let Some(name) = name_of("/history") {
                    return answer(blocking(move || engine.history(&name)).await, |v| {
                        json_response(StatusCode::OK, &v)
                    });
                }
            }
            Method::POST => {
                if let Some(name) = name_of("/push") {
                    let reference = with_tag(&req, name);
                    if let Err(e) = engine.valid_reference(&reference) {
                        return error(e.status(), &e.to_string());
                    }
                    let auth = match registry_auth(&req) {
                        Ok(a) => a,
                        Err(m) => return error(StatusCode::BAD_REQUEST, m),
                    };
                    return stream(move |send, _| engine.push(&reference, auth, send));
                }
                if let Some(name) = name_of("/tag") {
                    let Some(repo) = query::param(&req, "repo").filter(|r| !r.is_empty()) else {
                        return error(StatusCode::BAD_REQUEST, "repo is required");
                    };
                    let target = with_tag(&req, repo);
                    return answer(blocking(move || engine.tag(&name, &target)).await, |()| {
                        let mut r = Response::new(full(""));
                        *r.status_mut() = StatusCode::CREATED;
                        r
                    });
                }
            }
            Method::DELETE => {
                let name = percent_decode(rest).into_owned();
                let force = truthy(query::param(&req, "force"));
                return answer(blocking(move || engine.remove(&name, force)).await, |v| {
                    json_response(StatusCode::OK, &Value::Array(v))
                });
            }
            _ => {}
        }
    }
    if is_docker_route(path) {
        let message = format!(
            "gantry's daemon serves images only: {method} {} is not implemented",
            path.escape_default()
        );
        return refuse(req, StatusCode::NOT_IMPLEMENTED, &message).await;
    }
    // dockerd's answer to a path (or method) it has no route for.
    refuse(req, StatusCode::NOT_FOUND, "page not found").await
}

/// The Engine API's routes outside images, which gantry does not serve:
/// a 501 says so (dockerd would serve them). Any other path is a 404.
const NOT_SERVED: &[&str] = &[
    "/containers",
    "/build",
    "/commit",
    "/exec",
    "/networks",
    "/volumes",
    "/swarm",
    "/nodes",
    "/services",
    "/tasks",
    "/secrets",
    "/configs",
    "/plugins",
    "/session",
    "/grpc",
    "/events",
];

fn is_docker_route(path: &str) -> bool {
    NOT_SERVED.iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// `GET /version`: every field the Engine API documents, and the `Engine`
/// component with its details, which `docker version` prints.
fn version_json() -> Value {
    static KERNEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let kernel = KERNEL.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string()
    });
    let version = env!("CARGO_PKG_VERSION");
    // Go's architecture names (`amd64`), as dockerd's `runtime.GOARCH`;
    // the SDK matches them against registry platforms.
    let arch = gantry_core::platform::Platform::host().arch;
    // dockerd names the Go compiler; gantry names the Rust one.
    let compiler = env!("GANTRY_RUSTC_VERSION");
    let git_commit = option_env!("GANTRY_GIT_COMMIT").unwrap_or("");
    let build_time = option_env!("GANTRY_BUILD_TIME").unwrap_or("");
    json!({
        "Platform": {"Name": "gantry"},
        "Components": [{
            "Name": "Engine",
            "Version": version,
            "Details": {
                "ApiVersion": crate::API_VERSION,
                "Arch": arch,
                "BuildTime": build_time,
                "Experimental": "false",
                "GitCommit": git_commit,
                "GoVersion": compiler,
                "KernelVersion": kernel,
                "MinAPIVersion": crate::MIN_API_VERSION,
                "Os": "linux",
            },
        }],
        "Version": version,
        "ApiVersion": crate::API_VERSION,
        "MinAPIVersion": crate::MIN_API_VERSION,
        "GitCommit": git_commit,
        "GoVersion": compiler,
        "Os": "linux",
        "Arch": arch,
        "KernelVersion": kernel,
        "Experimental": false,
        "BuildTime": build_time,
    })
}

/// `GET /distribution/{name}/json`: the reference resolved at its
/// registry with the client's credentials (an unreadable
/// `X-Registry-Auth` is a 400, as for a pull).
async fn distribution(engine: Arc<dyn Engine>, name: String, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    if let Err(e) = engine.valid_reference(&name) {
        return error(e.status(), &e.to_string());
    }
    let auth = match registry_auth(req) {
        Ok(a) => a,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    answer(blocking(move || engine.distribution(&name, auth)).await, |d| {
        json_response(StatusCode::OK, &distribution_json(&d))
    })
}

/// `GET /system/df`: images with their shared sizes and the layers'
/// total; containers, volumes and build cache are empty (gantry has
/// none). `type` (API 1.42) asks for some of them only; the others are
/// `null`, as dockerd leaves them.
async fn system_df(engine: Arc<dyn Engine>, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    let types = query::params(req, "type");
    for t in &types {
        if !matches!(t.as_str(), "container" | "image" | "volume" | "build-cache") {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("unknown object type: {}", t.escape_default()),
            );
        }
    }
    let asked = |t: &str| types.is_empty() || types.iter().any(|x| x == t);
    let empty = |t: &str| if asked(t) { json!([]) } else { Value::Null };
    let mut out = json!({
        "LayersSize": 0,
        "Images": null,
        "Containers": empty("container"),
        "Volumes": empty("volume"),
        "BuildCache": empty("build-cache"),
    });
    if !asked("image") {
        return json_response(StatusCode::OK, &out);
    }
    answer(blocking(move || engine.disk_usage()).await, |du| {
        out["LayersSize"] = json!(du.layers_size);
        out["Images"] = du
            .images
            .iter()
            .map(|(s, shared)| summary_with_usage(s, *shared))
            .collect();
        json_response(StatusCode::OK, &out)
    })
}

/// A JSON message stream made by `work` on a blocking thread; a failure
/// is its last message (`errorDetail`), as dockerd sends it. `work` gets
/// the flag set once the client is gone (a message could not be delivered).
fn stream(
    work: impl FnOnce(&(dyn Fn(Value) + Sync), Arc<AtomicBool>) -> Result<(), EngineError> + Send + 'static,
) -> Response<Body> {
    let (tx, body) = ChannelBody::channel(256);
    let gone = Arc::new(AtomicBool::new(false));
    tokio::task::spawn_blocking(move || {
        let flag = gone.clone();
        let send = move |v: Value| {
            let mut line = serde_json::to_vec(&v).expect("serialisable");
            line.extend_from_slice(b"\r\n");
            if tx.blocking_send(Ok(Bytes::from(line))).is_err() {
                flag.store(true, Ordering::Relaxed);
            }
        };
        if let Err(e) = work(&send, gone) {
            let m = escape_line(&e.to_string());
            send(json!({"errorDetail": {"message": m}, "error": m}));
        }
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Bytes written on a blocking thread, sent as a response body.
struct ChannelWriter(tokio::sync::mpsc::Sender<Chunk>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `GET /images/get`: the archive streams as it is written. A failure
/// once bytes went out can only cut the stream (the client sees a
/// truncated archive, which `docker load` refuses).
fn save(engine: Arc<dyn Engine>, names: Vec<String>) -> Response<Body> {
    if names.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no image named");
    }
    let (tx, body) = ChannelBody::channel(16);
    tokio::task::spawn_blocking(move || {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, ChannelWriter(tx));
        if engine.save(&names, &mut out).is_ok() {
            let _ = std::io::Write::flush(&mut out);
        }
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/x-tar"));
    r
}

/// A request body read on a blocking thread.
struct BodyReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    buf: Bytes,
}

impl std::io::Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(b)) => self.buf = b,
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

/// The request body, for a blocking thread to read.
fn body_reader(req: Request<hyper::body::Incoming>) -> BodyReader {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        loop {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(60), body.frame()).await;
            let item = match frame {
                Err(_) => Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client sent nothing for 60 s",
                ))),
                Ok(None) => None,
                Ok(Some(Err(e))) => Some(Err(std::io::Error::other(e))),
                Ok(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => Some(Ok(d)),
                    Err(_) => continue,
                },
            };
            let Some(item) = item else { return };
            let end = item.is_err();
            if tx.send(item).await.is_err() || end {
                return;
            }
        }
    });
    BodyReader { rx, buf: Bytes::new() }
}

/// `POST /images/load`: the archive is the request body.
async fn load(engine: Arc<dyn Engine>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let mut reader = body_reader(req);
    stream(move |send, _| engine.load(&mut reader, send))
}

/// The most of a refused import's body read (and dropped) so that its
/// client gets the answer (a client still sending when the answer goes
/// sees a broken pipe, not the answer); past it, or past [`DRAIN_TIME`],
/// the connection is closed instead.
const DRAIN_MAX: u64 = 1 << 30;
/// The same bound for a route that is not served or does not exist:
/// enough for what a client sends before it reads (a container's config,
/// a small build context), not a stream worth reading to refuse it.
const REFUSED_BODY_MAX: u64 = 16 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads a refused request's body to its end, within `max` bytes and
/// [`DRAIN_TIME`]; whether it ended (else the connection must close: the
/// rest is still coming). A declared length past `max` is not read at all.
async fn drain(mut body: hyper::body::Incoming, max: u64) -> bool {
    use hyper::body::Body as _;
    if body.size_hint().lower() > max {
        return false;
    }
    let mut left = max;
    tokio::time::timeout(DRAIN_TIME, async {
        loop {
            match body.frame().await {
                None => return true,
                Some(Err(_)) => return false,
                Some(Ok(frame)) => {
                    if let Ok(d) = frame.into_data() {
                        match left.checked_sub(d.len() as u64) {
                            Some(l) => left = l,
                            None => return false,
                        }
                    }
                }
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Docker's error JSON for a request refused before its body was read:
/// the body is drained first (within `max`), and past the bound the
/// answer closes the connection.
async fn refuse_within(
    req: Request<hyper::body::Incoming>,
    max: u64,
    status: StatusCode,
    message: &str,
) -> Response<Body> {
    let ended = drain(req.into_body(), max).await;
    let mut r = error(status, message);
    if !ended {
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// [`refuse_within`] the bound for routes not served.
async fn refuse(req: Request<hyper::body::Incoming>, status: StatusCode, message: &str) -> Response<Body> {
    refuse_within(req, REFUSED_BODY_MAX, status, message).await
}

/// The largest `POST /auth` body.
const MAX_AUTH_BODY: usize = 64 << 10;

/// `POST /auth`: `{"username", "password", "serveraddress"}` (or an
/// `identitytoken`); Docker's `{"Status": "Login Succeeded"}` when the
/// registry takes them.
async fn auth(engine: Arc<dyn Engine>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let body = match tokio::time::timeout(
        std::time::Duration::from_secs(30),
        http_body_util::Limited::new(req.into_body(), MAX_AUTH_BODY).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => return error(StatusCode::BAD_REQUEST, "the credentials are larger than 64 KiB"),
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "the client sent its credentials too slowly",
            )
        }
    };
    #[derive(serde::Deserialize)]
    struct Login {
        #[serde(default)]
        username: String,
        #[serde(default)]
        password: String,
        #[serde(default)]
        serveraddress: String,
        #[serde(default)]
        identitytoken: String,
    }
    let login: Login = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid credentials JSON: {e}")),
    };
    if login.username.is_empty() && login.identitytoken.is_empty() {
        return error(StatusCode::BAD_REQUEST, "a username (or an identity token) is required");
    }
    let credentials = RegistryAuth {
        username: login.username,
        password: login.password,
        identity_token: (!login.identitytoken.is_empty()).then_some(login.identitytoken),
    };
    let server = login.serveraddress;
    answer(blocking(move || engine.auth(&server, credentials)).await, |()| {
        json_response(
            StatusCode::OK,
            &json!({"Status": "Login Succeeded", "IdentityToken": ""}),
        )
    })
}

/// `POST /images/create`: a pull (`fromImage`) or an import (`fromSrc`).
async fn create(engine: Arc<dyn Engine>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if let Some(image) = query::param(&req, "fromImage").filter(|i| !i.is_empty()) {
        return pull(engine, image, req);
    }
    let Some(src) = query::param(&req, "fromSrc").filter(|s| !s.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "give fromImage (a pull) or fromSrc (an import)",
        );
    };
    if src != "-" {
        return refuse_within(
            req,
            DRAIN_MAX,
            StatusCode::NOT_IMPLEMENTED,
            "importing from a URL is not supported: send the tarball as the request body (fromSrc=-)",
        )
        .await;
    }
    let repo = query::param(&req, "repo").filter(|r| !r.is_empty());
    let request = ImportRequest {
        reference: repo.map(|r| with_tag(&req, r)),
        message: query::param(&req, "message").filter(|m| !m.is_empty()),
        changes: query::params(&req, "changes"),
        platform: query::param(&req, "platform").filter(|p| !p.is_empty()),
    };
    if let Err(e) = engine.check_import(&request) {
        // The client is sending its tarball already: read it out, or it
        // sees a broken pipe instead of the answer.
        return refuse_within(req, DRAIN_MAX, e.status(), &e.to_string()).await;
    }
    let mut reader = body_reader(req);
    stream(move |send, _| engine.import(&request, &mut reader, send))
}

/// `POST /images/create?fromImage=NAME&tag=TAG`: a pull, its progress
/// streamed as Docker's JSON messages; a failure after the stream started
/// is its last message (`errorDetail`), as dockerd sends it.
fn pull(engine: Arc<dyn Engine>, image: String, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let reference = match query::param(&req, "tag") {
        Some(t) if t.starts_with("sha256:") => format!("{image}@{t}"),
        _ => with_tag(&req, image),
    };
    if let Err(e) = engine.valid_reference(&reference) {
        return error(e.status(), &e.to_string());
    }
    let auth = match registry_auth(&req) {
        Ok(a) => a,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    stream(move |send, gone| engine.pull(&reference, auth, send, gone))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_negotiated() {
        assert_eq!(strip_version("/v1.47/images/json").ok(), Some("/images/json"));
        assert_eq!(strip_version("/v1.24/_ping").ok(), Some("/_ping"));
        assert_eq!(strip_version("/images/json").ok(), Some("/images/json"));
        assert!(strip_version("/v1.99/images/json").is_err());
        assert!(strip_version("/v1.12/images/json").is_err());
        assert_eq!(percent_decode("docker.io%2Flibrary%2Fbar"), "docker.io/library/bar");
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn prune_filters_follow_docker() {
        let now = 1_800_000_000;
        let image =
            |tags: Value, created: i64, labels: Value| json!({"RepoTags": tags, "Created": created, "Labels": labels});
        let dangling = image(json!([]), now - 7200, json!({"tier": "a"}));
        let tagged = image(json!(["x:1"]), now - 60, json!({}));
        let f = PruneFilters::default();
        assert!(f.selects(&dangling) && !f.selects(&tagged));
        let all = PruneFilters::parse(r#"{"dangling":["false"]}"#, now).unwrap();
        assert!(all.selects(&dangling) && all.selects(&tagged));
        let old = PruneFilters::parse(r#"{"dangling":["false"],"until":["1h"]}"#, now).unwrap();
        assert!(old.selects(&dangling) && !old.selects(&tagged));
        let stamp = PruneFilters::parse(&format!(r#"{{"until":["{}"]}}"#, now - 3600), now).unwrap();
        assert!(stamp.selects(&dangling));
        let rfc = PruneFilters::parse(r#"{"until":["2000-01-01T00:00:00Z"]}"#, now).unwrap();
        assert!(!rfc.selects(&dangling));
        let label = PruneFilters::parse(r#"{"label":["tier=a"]}"#, now).unwrap();
        assert!(label.selects(&dangling));
        let not = PruneFilters::parse(r#"{"label!":["tier"]}"#, now).unwrap();
        assert!(!not.selects(&dangling));
        for bad in [
            r#"{"until":["soon"]}"#,
            r#"{"colour":["red"]}"#,
            r#"{"dangling":["maybe"]}"#,
            "[]",
        ] {
            assert!(PruneFilters::parse(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_filters_follow_docker() {
        let img = json!({"RepoTags": ["127.0.0.1:5000/team/app:v1"], "Labels": {"tier": "web"}});
        let none = json!({"RepoTags": [], "Labels": {}});
        let f = |s: &str| Filters::parse(s).unwrap();
        assert!(f(r#"{"reference":["127.0.0.1:5000/team/app"]}"#).keep(&img));
        assert!(f(r#"{"reference":["127.0.0.1:5000/team/*:v1"]}"#).keep(&img));
        assert!(!f(r#"{"reference":["*:v1"]}"#).keep(&img), "* does not cross /");
        assert!(f(r#"{"dangling":["true"]}"#).keep(&none));
        assert!(!f(r#"{"dangling":["true"]}"#).keep(&img));
        assert!(f(r#"{"label":{"tier=web":true}}"#).keep(&img));
        assert!(!f(r#"{"label":["tier=db"]}"#).keep(&img));
        assert!(Filters::parse(r#"{"color":["red"]}"#).is_err());
        assert!(Filters::parse("not json").is_err());
    }
}
