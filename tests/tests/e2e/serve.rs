//! `gantry serve --from-store`: real registry clients (skopeo, podman,
//! gantry itself) pull what the store holds, with the registry's digests;
//! bad requests get the registry's error JSON or a closed connection, and
//! the server keeps serving everyone else.

use crate::{control_image, peers, publish};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{rich_layers, sha256, Image, Layout};
use gantry_tests::registry::Registry;
use gantry_tests::require;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub(crate) fn skopeo(args: &[&str]) -> String {
    let out = std::process::Command::new("skopeo").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// podman pulls `image` over plain HTTP into a storage of its own (a
/// skip when podman is not installed).
pub(crate) fn podman_pull(image: &str) {
    if !require("podman") {
        return;
    }
    let pm = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("podman")
        .arg("--root")
        .arg(pm.path().join("root"))
        .arg("--runroot")
        .arg(pm.path().join("run"))
        .args([
            "--storage-driver",
            "vfs",
            "--events-backend",
            "none",
            "pull",
            "-q",
            "--tls-verify=false",
        ])
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "podman: {}", String::from_utf8_lossy(&out.stderr));
}

/// Sends `request` as is and reads the answer until the server closes.
pub(crate) fn raw(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn get(addr: &str, path: &str) -> String {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

pub(crate) fn status(resp: &str) -> u16 {
    resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

pub(crate) fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

pub(crate) fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

pub(crate) fn error_code(resp: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body(resp)).unwrap_or_else(|_| panic!("not JSON: {resp}"));
    v["errors"][0]["code"].as_str().unwrap_or("").to_string()
}

#[test]
fn registry_clients_pull_from_the_store_with_the_registry_digests() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let (_p, m, layers) = publish(&reg, "test/app", "v1", &Image::new(rich_layers()));
    publish(&reg, "test/app", "v2", &control_image());
    publish(&reg, "other/thing", "latest", &control_image());
    let g = Gantry::new();
    for r in ["test/app:v1", "test/app:v2", "other/thing:latest"] {
        g.ok(&["pull", &format!("{}/{r}", reg.addr())]);
    }
    let mut srv = g.serve(&["--from-store"]);
    let a = srv.addr.clone();

    // skopeo sees the registry's manifest digest and the tags.
    let inspected: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{a}/test/app:v1"),
    ]))
    .unwrap();
    assert_eq!(inspected["Digest"], m.digest.as_str(), "{inspected}");
    let tags: serde_json::Value = serde_json::from_str(&skopeo(&[
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{a}/test/app"),
    ]))
    .unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["v1", "v2"]), "{tags}");

    // skopeo copies the same bytes from gantry as from docker-registry.
    let dir = tempfile::tempdir().unwrap();
    for (src, out) in [(a.as_str(), "from-gantry"), (reg.addr().as_str(), "from-registry")] {
        skopeo(&[
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            &format!("docker://{src}/test/app:v1"),
            &format!("oci:{}:v1", dir.path().join(out).display()),
        ]);
    }
    let index = |d: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.path().join(d).join("index.json")).unwrap()).unwrap()
    };
    assert_eq!(
        index("from-gantry")["manifests"][0]["digest"],
        index("from-registry")["manifests"][0]["digest"]
    );
    for l in &layers {
        assert!(dir
            .path()
            .join("from-gantry/blobs/sha256")
            .join(&l.digest[7..])
            .is_file());
    }

    // gantry pulls from gantry: the same image.
    let g2 = Gantry::new();
    g2.ok(&["pull", &format!("{a}/test/app:v1")]);
    let id = |g: &Gantry, name: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&g.ok(&["inspect", name])).unwrap()[0]["Id"].clone()
    };
    assert_eq!(
        id(&g2, &format!("{a}/test/app:v1")),
        id(&g, &format!("{}/test/app:v1", reg.addr()))
    );
    g2.fsck_clean();

    // podman pulls into its own storage.
    podman_pull(&format!("{a}/test/app:v1"));

    // The API itself: base, catalog pages, HEAD, ranges.
    let r = get(&a, "/v2/");
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(header(&r, "Docker-Distribution-API-Version"), Some("registry/2.0"));
    let r = get(&a, "/v2/_catalog?n=1");
    assert_eq!(body(&r), r#"{"repositories":["other/thing"]}"#, "{r}");
    let next = header(&r, "Link").expect("a Link to the next page");
    assert_eq!(next, r#"</v2/_catalog?last=other/thing&n=1>; rel="next""#);
    let r = get(&a, "/v2/_catalog?last=other/thing&n=1");
    assert_eq!(body(&r), r#"{"repositories":["test/app"]}"#, "{r}");
    assert_eq!(header(&r, "Link"), None);
    let r = raw(
        &a,
        b"HEAD /v2/test/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(header(&r, "Docker-Content-Digest"), Some(m.digest.as_str()));
    assert_eq!(header(&r, "Content-Type"), Some(m.media_type.as_str()));
    assert_eq!(body(&r), "");
    let big = &layers[0];
    let r = raw(
        &a,
        format!(
            "GET /v2/test/app/blobs/{} HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\nConnection: close\r\n\r\n",
            big.digest
        )
        .as_bytes(),
    );
    assert_eq!(status(&r), 206, "{r}");
    assert_eq!(
        header(&r, "Content-Range"),
        Some(format!("bytes 10-19/{}", big.size).as_str())
    );
    // The whole blob hashes to its digest (read as bytes, not text).
    let mut s = TcpStream::connect(&a).unwrap();
    write!(
        s,
        "GET /v2/test/app/blobs/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        big.digest
    )
    .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(sha256(&all[split..]), big.digest);
    // A blob of another repository is not this one's.
    let r = get(&a, &format!("/v2/other/thing/blobs/{}", big.digest));
    assert_eq!((status(&r), error_code(&r).as_str()), (404, "BLOB_UNKNOWN"), "{r}");

    // One access-log line per request, and a clean exit on SIGTERM.
    let log = srv.log();
    assert!(log.contains("\"GET /v2/_catalog?n=1\" 200"), "{log}");
    assert!(log.contains("\"HEAD /v2/test/app/manifests/v1\" 200"), "{log}");
    let st = srv.terminate();
    assert!(st.success(), "{st:?}");
}

#[test]
fn bad_requests_get_registry_errors_and_the_server_keeps_serving() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/app", "v1", &control_image());
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/app:v1", reg.addr())]);
    let srv = g.serve(&["--from-store", "--header-timeout", "2"]);
    let a = srv.addr.clone();

    let zeros = format!("sha256:{}", "0".repeat(64));
    for (path, want, code) in [
        ("/v2/../etc/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/test/%2e%2e/app/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/Test/App/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/test/app/manifests/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/test/app/manifests/-bad", 400, "TAG_INVALID"),
        ("/v2/test/app/blobs/md5:0000", 400, "DIGEST_INVALID"),
        ("/v2/test/app/manifests/nope", 404, "MANIFEST_UNKNOWN"),
        ("/v2/no/such/manifests/v1", 404, "NAME_UNKNOWN"),
        ("/v2/no/such/tags/list", 404, "NAME_UNKNOWN"),
        ("/v2/_catalog?n=x", 400, "PAGINATION_NUMBER_INVALID"),
    ] {
        let r = get(&a, path);
        assert_eq!((status(&r), error_code(&r).as_str()), (want, code), "{path}: {r}");
    }
    let r = get(&a, &format!("/v2/test/app/blobs/{zeros}"));
    assert_eq!((status(&r), error_code(&r).as_str()), (404, "BLOB_UNKNOWN"), "{r}");
    let r = raw(
        &a,
        b"PUT /v2/test/app/manifests/v2 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert_eq!((status(&r), error_code(&r).as_str()), (405, "UNSUPPORTED"), "{r}");
    let r = raw(
        &a,
        format!(
            "GET /v2/test/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(200_000)
        )
        .as_bytes(),
    );
    assert!(r.is_empty() || status(&r) == 431 || status(&r) == 400, "{r}");

    // Slow and silent clients, a thousand of them, are closed after the
    // header timeout; a polite client is answered meanwhile.
    let mut idle: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(&a).unwrap()).collect();
    let mut slow = TcpStream::connect(&a).unwrap();
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    let r = get(&a, "/v2/test/app/manifests/v1");
    assert_eq!(status(&r), 200, "{r}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a polite client waited {:?}",
        t.elapsed()
    );
    slow.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "a slowloris client was kept {:?}",
        t.elapsed()
    );
    let mut closed = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if matches!(s.read(&mut [0u8; 16]), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    assert_eq!(closed, idle.len(), "idle connections are closed");
    let r = get(&a, "/v2/test/app/manifests/v1");
    assert_eq!(status(&r), 200, "{r}");
}

/// The air-gapped way: an image that came in by `load` (no registry
/// content) is served with the manifest `save --format oci` writes for it,
/// its layers rebuilt as they are sent: skopeo copies it out, `gantry
/// pull` of it gives the image ID that was loaded, the digest is the same
/// after a restart, and a byte range of a layer is that range of the tar.
#[test]
fn loaded_images_are_served_as_save_writes_them() {
    if !peers() {
        return;
    }
    let dir = gantry_tests::open_tempdir();
    let layout_dir = dir.path().join("layout");
    let mut layout = Layout::create(&layout_dir);
    let (m, _) = layout.image(&Image::new(rich_layers()));
    layout.tag("v1", &m, None);
    let archive = dir.path().join("docker.tar");
    skopeo(&[
        "copy",
        "--quiet",
        &format!("oci:{}:v1", layout_dir.display()),
        &format!("docker-archive:{}:example.com/air/gapped:v1", archive.display()),
    ]);
    let g = Gantry::new();
    g.ok(&["load", "-i", archive.to_str().unwrap()]);
    let id = serde_json::from_str::<serde_json::Value>(&g.ok(&["inspect", "example.com/air/gapped:v1"])).unwrap()[0]
        ["Id"]
        .clone();
    // What `save --format oci` writes is what the registry answers.
    let saved = dir.path().join("saved.tar");
    g.ok(&[
        "save",
        "--format",
        "oci",
        "-o",
        saved.to_str().unwrap(),
        "example.com/air/gapped:v1",
    ]);
    let saved_digest =
        serde_json::from_str::<serde_json::Value>(&skopeo(&["inspect", &format!("oci-archive:{}", saved.display())]))
            .unwrap()["Digest"]
            .clone();

    let mut srv = g.serve(&["--from-store"]);
    let inspected: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/air/gapped:v1", srv.addr),
    ]))
    .unwrap();
    assert_eq!(inspected["Digest"], saved_digest, "{inspected}");
    let out = dir.path().join("out");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{}/air/gapped:v1", srv.addr),
        &format!("oci:{}:v1", out.display()),
    ]);
    let other = Gantry::new();
    other.ok(&["pull", &format!("{}/air/gapped:v1", srv.addr)]);
    let pulled =
        serde_json::from_str::<serde_json::Value>(&other.ok(&["inspect", &format!("{}/air/gapped:v1", srv.addr)]))
            .unwrap()[0]["Id"]
            .clone();
    assert_eq!(pulled, id);

    // A range of a layer is that range of the rebuilt tar.
    let layer = inspected["Layers"][0].as_str().unwrap().to_string();
    let whole = ureq::get(&format!("http://{}/v2/air/gapped/blobs/{layer}", srv.addr))
        .call()
        .unwrap();
    let mut all = Vec::new();
    whole.into_reader().read_to_end(&mut all).unwrap();
    assert_eq!(sha256(&all), layer);
    let part = ureq::get(&format!("http://{}/v2/air/gapped/blobs/{layer}", srv.addr))
        .set("Range", "bytes=100-1123")
        .call()
        .unwrap();
    assert_eq!(part.status(), 206);
    let mut bytes = Vec::new();
    part.into_reader().read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, all[100..1124]);

    // The same digest after a restart.
    srv.terminate();
    let srv = g.serve(&["--from-store"]);
    let again: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/air/gapped:v1", srv.addr),
    ]))
    .unwrap();
    assert_eq!(again["Digest"], saved_digest);
}
