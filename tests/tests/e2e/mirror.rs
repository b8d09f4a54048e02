//! `gantry serve --mirror-of`: a pull-through cache. The first pull fills
//! it, the next is served with the upstream gone; a lying upstream leaves
//! nothing cached; two clients missing the same blob cause one upstream
//! fetch; it answers as docker-registry's own proxy mode does.

use crate::{control_image, peers, publish};
use gantry_tests::gantry::{Gantry, Server};
use gantry_tests::image::{rich_layers, Image};
use gantry_tests::proxy::{Faults, Proxy};
use gantry_tests::registry::Registry;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn skopeo_digest(addr: &str, name: &str) -> String {
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", &format!("docker://{addr}/{name}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["Digest"].as_str().unwrap().to_string()
}

/// The blobs the mirror cached (digests).
fn cached(server_store: &Gantry) -> Vec<String> {
    let dir = server_store.root_path().join("mirror/blobs/sha256");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn ingest_is_empty(server_store: &Gantry) -> bool {
    std::fs::read_dir(server_store.root_path().join("mirror/ingest"))
        .map(|mut rd| rd.next().is_none())
        .unwrap_or(true)
}

#[test]
fn the_first_pull_fills_the_cache_and_the_next_is_served_with_the_upstream_gone() {
    if !peers() {
        return;
    }
    let upstream = Registry::start();
    let (_p, m, layers) = publish(&upstream, "test/app", "v1", &Image::new(rich_layers()));
    let mirror_store = Gantry::new();
    // Tag answers expire at once: the second pull asks the (stopped)
    // upstream and is served the stale answer.
    let srv = mirror_store.serve(&["--mirror-of", &format!("http://{}", upstream.addr()), "--tag-ttl", "0"]);
    let name = format!("{}/test/app:v1", srv.addr);

    // docker-registry's own proxy mode answers the same digest.
    let theirs = Registry::start_proxy(&format!("http://{}", upstream.addr()));
    assert_eq!(skopeo_digest(&srv.addr, "test/app:v1"), m.digest);
    assert_eq!(skopeo_digest(&theirs.addr(), "test/app:v1"), m.digest);

    let g = Gantry::new();
    g.ok(&["pull", &name]);
    let held = cached(&mirror_store);
    for l in &layers {
        assert!(held.contains(&l.digest), "{} not cached: {held:?}", l.digest);
    }
    assert!(held.contains(&m.digest), "the manifest is cached");
    assert!(ingest_is_empty(&mirror_store));

    drop(upstream);
    let g2 = Gantry::new();
    g2.ok(&["pull", &name]);
    let id = |g: &Gantry| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&g.ok(&["inspect", &name])).unwrap()[0]["Id"].clone()
    };
    assert_eq!(id(&g2), id(&g));
    g2.fsck_clean();
    // A name never pulled is an error, not a hang.
    let err = g2.fails(&["pull", &format!("{}/test/other:v1", srv.addr)]);
    assert!(!err.is_empty());
}

#[test]
fn a_lying_upstream_leaves_nothing_cached() {
    if !peers() {
        return;
    }
    let upstream = Registry::start();
    let (_p, _, layers) = publish(&upstream, "test/app", "v1", &Image::new(rich_layers()));
    publish(&upstream, "test/control", "v1", &control_image());
    let bad = layers.last().unwrap().digest.clone();
    let liar = Proxy::start(
        upstream.port,
        Faults {
            corrupt_blob: Some(bad.clone()),
            ..Default::default()
        },
    );
    let (mirror_store, srv) = mirror_of(&liar.addr(), &[]);
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/control:v1", srv.addr)]);
    let before = g.store_listing();
    let err = g.fails(&["pull", &format!("{}/test/app:v1", srv.addr)]);
    assert!(!err.is_empty());
    assert_eq!(g.store_listing(), before, "the failed pull changed the client's store");
    let held = cached(&mirror_store);
    assert!(!held.contains(&bad), "the wrong bytes were cached: {held:?}");
    assert!(ingest_is_empty(&mirror_store));
    // Asked directly, the client never gets the whole wrong blob either.
    let (_, body) = get(&srv.addr, &format!("/v2/test/app/blobs/{bad}"), usize::MAX);
    assert_ne!(gantry_tests::image::sha256(&body), bad);
    assert!(!cached(&mirror_store).contains(&bad));
}

#[test]
fn two_clients_missing_the_same_blob_cause_one_upstream_fetch() {
    if !peers() {
        return;
    }
    let upstream = Registry::start();
    let (_p, _, layers) = publish(&upstream, "test/app", "v1", &control_image());
    let blob = layers[0].digest.clone();
    let slow = Proxy::start(
        upstream.port,
        Faults {
            delay_blob: Some((blob.clone(), Duration::from_millis(800))),
            ..Default::default()
        },
    );
    let (_mirror_store, srv) = mirror_of(&slow.addr(), &[]);
    let fetch = |addr: String, blob: String| {
        std::thread::spawn(move || {
            let (_, body) = get(&addr, &format!("/v2/test/app/blobs/{blob}"), usize::MAX);
            gantry_tests::image::sha256(&body)
        })
    };
    let a = fetch(srv.addr.clone(), blob.clone());
    std::thread::sleep(Duration::from_millis(100));
    let b = fetch(srv.addr.clone(), blob.clone());
    assert_eq!(a.join().unwrap(), blob);
    assert_eq!(b.join().unwrap(), blob);
    assert_eq!(slow.seen.lock().unwrap().blob_gets.get(&blob).copied(), Some(1));
    // And a ranged request is served from the cache.
    let ranged = request(
        &srv.addr,
        &format!("/v2/test/app/blobs/{blob}"),
        "Range: bytes=0-3\r\n",
        usize::MAX,
    );
    assert_eq!(ranged.status, 206, "{}", ranged.head);
    assert_eq!(slow.seen.lock().unwrap().blob_gets.get(&blob).copied(), Some(1));
}

#[test]
fn a_client_pulls_through_a_mirror_that_serves_the_registry_under_a_prefix() {
    if !peers() {
        return;
    }
    let upstream = Registry::start();
    publish(&upstream, "test/app", "v1", &control_image());
    let mirror_store = Gantry::new();
    let srv = mirror_store.serve(&["--mirror-of", &format!("up=http://{}", upstream.addr())]);
    let config = format!(
        "[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n[registries.\"{}\"]\nmirrors = [\"http://{}/up\"]\n",
        Gantry::test_driver(),
        upstream.addr(),
        srv.addr
    );
    let name = format!("{}/test/app:v1", upstream.addr());
    let g = Gantry::new().with_config(&config);
    let out = g.ok(&["pull", &name]);
    assert!(out.contains("v1: Pulling from test/app"), "{out}");
    let log = srv.log();
    assert!(log.contains("\"GET /v2/up/test/app/manifests/v1\" 200"), "{log}");
    // The image is known by the registry's name, not the mirror's.
    let inspected: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", &name])).unwrap();
    assert_eq!(inspected[0]["RepoTags"][0], format!("{}/test/app:v1", upstream.addr()));
    // With the registry gone, the mirror alone serves the next client.
    drop(upstream);
    let g2 = Gantry::new().with_config(&config);
    g2.ok(&["pull", &name]);
    g2.fsck_clean();
}

/// The oras Python client pushes an artifact (not an image) to the
/// upstream and pulls it through the mirror.
#[test]
fn oras_pulls_an_artifact_through_the_mirror() {
    if !peers() {
        return;
    }
    let Some(python) = gantry_tests::oras_python() else {
        return;
    };
    let upstream = Registry::start();
    let (_mirror_store, srv) = mirror_of(&upstream.addr(), &[]);
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("notes.txt"), b"an artifact, not an image\n").unwrap();
    let script = r#"
import sys, oras.client
op, host, target, outdir = sys.argv[1:5]
c = oras.client.OrasClient(hostname=host, insecure=True)
if op == "push":
    c.push(files=["notes.txt"], target=target)
else:
    print(c.pull(target=target, outdir=outdir))
"#;
    let run = |op: &str, host: &str, outdir: &str| {
        let out = std::process::Command::new(&python)
            .current_dir(work.path())
            .args(["-c", script, op, host, &format!("{host}/test/notes:v1"), outdir])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "oras {op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("push", &upstream.addr(), "-");
    let out = work.path().join("out");
    run("pull", &srv.addr, out.to_str().unwrap());
    assert_eq!(
        std::fs::read(out.join("notes.txt")).unwrap(),
        b"an artifact, not an image\n"
    );
    assert!(srv.log().contains("\"GET /v2/test/notes/manifests/v1\" 200"));
}

/// A raw `GET` of `path` from `addr`: the status and up to `max` bytes of
/// the body, read until the server closes (or `max` is reached: then the
/// client hangs up, as one that goes away).
fn get(addr: &str, path: &str, max: usize) -> (u16, Vec<u8>) {
    let a = request(addr, path, "", max);
    (a.status, a.body)
}

/// An answer read off the wire.
struct Answer {
    status: u16,
    /// The status line and headers, as sent.
    head: String,
    body: Vec<u8>,
}

/// A raw `GET` of `path` from `addr` with `headers` (each ending in
/// `\r\n`): the answer, its body up to `max` bytes, read until the server
/// closes (or `max` is reached: then the client hangs up).
fn request(addr: &str, path: &str, headers: &str, max: usize) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut body_at = None;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        got.extend_from_slice(&buf[..n]);
        if body_at.is_none() {
            body_at = got.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
        }
        if body_at.is_some_and(|b| got.len() - b >= max) {
            break;
        }
    }
    let body = got.split_off(body_at.unwrap_or(got.len()));
    let head = String::from_utf8_lossy(&got).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Answer { status, head, body }
}

/// A `gantry serve --mirror-of http://UPSTREAM ARGS…` on a store of its own.
pub(crate) fn mirror_of(upstream: &str, args: &[&str]) -> (Gantry, Server) {
    let store = Gantry::new();
    let url = format!("http://{upstream}");
    let mut all = vec!["--mirror-of", url.as_str()];
    all.extend_from_slice(args);
    let srv = store.serve(&all);
    (store, srv)
}

/// The upstream is untrusted: a redirect of a blob to an internal address
/// (here 127.0.0.2, another machine's service as far as the mirror knows)
/// is not followed, and no connection is made there; the client gets an
/// error. Listed in the upstream's `redirect_hosts`, the same target is
/// followed (without the token).
#[test]
fn an_upstream_redirecting_a_blob_to_an_internal_address_reaches_nothing() {
    if !peers() {
        return;
    }
    let upstream = Registry::start();
    let (_p, _, layers) = publish(&upstream, "test/app", "v1", &control_image());
    let blob = layers[0].digest.clone();
    let redirecting = Proxy::start(
        upstream.port,
        Faults {
            token_auth: true,
            redirect_blobs: true,
            cdn_host: Some("127.0.0.2".into()),
            ..Default::default()
        },
    );
    let (mirror_store, srv) = mirror_of(&redirecting.addr(), &[]);
    let (status, body) = get(&srv.addr, &format!("/v2/test/app/blobs/{blob}"), usize::MAX);
    assert!(status >= 500, "{status} {}", String::from_utf8_lossy(&body));
    assert_eq!(
        redirecting.seen.lock().unwrap().cdn_connections,
        0,
        "the internal address was reached"
    );
    let g = Gantry::new();
    assert!(!g.fails(&["pull", &format!("{}/test/app:v1", srv.addr)]).is_empty());
    assert_eq!(
        redirecting.seen.lock().unwrap().cdn_connections,
        0,
        "the internal address was reached"
    );
    assert!(!cached(&mirror_store).contains(&blob));

    // The operator lists the storage host: the redirect is followed.
    let allowed = Gantry::new().with_config(&format!(
        "[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n[registries.\"{}\"]\nredirect_hosts = [\"127.0.0.2\"]\n",
        Gantry::test_driver(),
        redirecting.addr()
    ));
    let srv = allowed.serve(&["--mirror-of", &format!("http://{}", redirecting.addr())]);
    let (status, body) = get(&srv.addr, &format!("/v2/test/app/blobs/{blob}"), usize::MAX);
    assert_eq!(status, 200);
    assert_eq!(gantry_tests::image::sha256(&body), blob);
    let seen = redirecting.seen.lock().unwrap();
    assert!(seen.cdn_gets >= 1);
    assert!(
        seen.cdn_authorization.is_empty(),
        "token leaked: {:?}",
        seen.cdn_authorization
    );
}

/// The token realm an upstream names is a hop like any other: on an
/// internal address it is not fetched.
#[test]
fn an_upstream_naming_an_internal_token_realm_reaches_nothing() {
    if !peers() {
        return;
    }
    let upstream = Registry::start();
    publish(&upstream, "test/app", "v1", &control_image());
    let proxy = Proxy::start(
        upstream.port,
        Faults {
            token_auth: true,
            realm_on_cdn: true,
            cdn_host: Some("127.0.0.2".into()),
            ..Default::default()
        },
    );
    let (_mirror_store, srv) = mirror_of(&proxy.addr(), &[]);
    let (status, _) = get(&srv.addr, "/v2/test/app/manifests/v1", usize::MAX);
    assert!(status >= 400 && status != 404, "{status}");
    assert_eq!(
        proxy.seen.lock().unwrap().cdn_connections,
        0,
        "the internal realm was reached"
    );
}

/// One upstream fetch of a blob serves every repository that holds it:
/// a client asking for it in repository B while it is being fetched for A
/// gets it once the upstream confirmed B has it, and a repository the
/// upstream does not hold it in gets a 404 although the bytes are cached.
#[test]
fn a_blob_being_fetched_for_one_repository_is_served_to_another_that_has_it() {
    if !peers() {
        return;
    }
    let upstream = Registry::start();
    let shared = gantry_tests::image::Layer::new()
        .file("shared", 0o644, &vec![7u8; 300_000])
        .tar();
    let (_pa, _, la) = publish(&upstream, "test/a", "v1", &Image::new(vec![shared.clone()]));
    let (_pb, _, lb) = publish(&upstream, "test/b", "v1", &Image::new(vec![shared]));
    publish(&upstream, "test/control", "v1", &control_image());
    let blob = la[0].digest.clone();
    assert_eq!(lb[0].digest, blob);
    let slow = Proxy::start(
        upstream.port,
        Faults {
            delay_blob: Some((blob.clone(), Duration::from_millis(1000))),
            ..Default::default()
        },
    );
    let (mirror_store, srv) = mirror_of(&slow.addr(), &[]);
    let fetch = |repo: &str| {
        let (addr, path) = (srv.addr.clone(), format!("/v2/{repo}/blobs/{blob}"));
        std::thread::spawn(move || get(&addr, &path, usize::MAX))
    };
    let a = fetch("test/a");
    std::thread::sleep(Duration::from_millis(200));
    let b = fetch("test/b");
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_eq!((a.0, gantry_tests::image::sha256(&a.1)), (200, blob.clone()));
    assert_eq!((b.0, gantry_tests::image::sha256(&b.1)), (200, blob.clone()));
    // Cached now, but the upstream's test/control does not hold it.
    assert!(cached(&mirror_store).contains(&blob));
    let (status, _) = get(&srv.addr, &format!("/v2/test/control/blobs/{blob}"), usize::MAX);
    assert_eq!(status, 404);
    assert_eq!(get(&srv.addr, &format!("/v2/test/b/blobs/{blob}"), usize::MAX).0, 200);
}

/// A blob announced as 1 TiB is refused at once (over the size cap); with
/// a cap above it, the fetch stops when the only client leaves.
#[test]
fn a_huge_blob_is_refused_and_a_fetch_nobody_waits_for_stops() {
    if !peers() {
        return;
    }
    let upstream = Registry::start();
    let huge = format!("sha256:{}", "ab".repeat(32));
    let proxy = Proxy::start(
        upstream.port,
        Faults {
            endless_blob: Some((huge.clone(), 1 << 40)),
            ..Default::default()
        },
    );
    let wait_closed = |proxy: &Proxy| {
        let started = std::time::Instant::now();
        while !proxy.seen.lock().unwrap().endless_closed {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the mirror kept downloading: {} bytes",
                proxy.seen.lock().unwrap().endless_sent
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (_mirror_store, srv) = mirror_of(&proxy.addr(), &[]);
    let (status, body) = get(&srv.addr, &format!("/v2/test/app/blobs/{huge}"), 4 << 20);
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
    assert!(status >= 500 && text.contains("limit"), "{status}: {text}");
    wait_closed(&proxy);

    let proxy = Proxy::start(
        upstream.port,
        Faults {
            endless_blob: Some((huge.clone(), 1 << 40)),
            ..Default::default()
        },
    );
    let mirror_store = Gantry::new().with_config(&format!(
        "[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n[mirror]\nmax_blob_mib = 2097152\n",
        Gantry::test_driver()
    ));
    let srv = mirror_store.serve(&["--mirror-of", &format!("http://{}", proxy.addr())]);
    let (status, body) = get(&srv.addr, &format!("/v2/test/app/blobs/{huge}"), 2 << 20);
    assert_eq!(status, 200);
    assert!(body.len() >= 2 << 20);
    wait_closed(&proxy);
    assert!(ingest_is_empty(&mirror_store));
}

/// What an upstream says a manifest's type is does not reach clients
/// unless it is a manifest type: a manifest sent as `text/html` is served
/// as what its document says it is.
#[test]
fn a_manifest_is_served_only_as_a_manifest_type() {
    if !peers() {
        return;
    }
    let upstream = Registry::start();
    publish(&upstream, "test/app", "v1", &control_image());
    let proxy = Proxy::start(
        upstream.port,
        Faults {
            manifest_content_type: Some("text/html".into()),
            ..Default::default()
        },
    );
    let (_mirror_store, srv) = mirror_of(&proxy.addr(), &[]);
    let answer = request(&srv.addr, "/v2/test/app/manifests/v1", "", usize::MAX);
    let got = answer.head.to_ascii_lowercase();
    assert_eq!(answer.status, 200, "{got}");
    assert!(!got.contains("content-type: text/html"), "{got}");
    assert!(
        got.contains("content-type: application/vnd.oci.image.manifest.v1+json"),
        "{got}"
    );
}
