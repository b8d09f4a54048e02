//! Pushes: `gantry serve` taking pushes from a real client (skopeo) and
//! refusing bad ones; `gantry push` to docker-registry and to gantry serve.

use crate::serve::{error_code, get, header, raw, skopeo, status};
use crate::{assert_export_matches_umoci, peers};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{rich_layers, sha256, Image, Layout};
use gantry_tests::registry::Registry;

/// `METHOD PATH` with `headers` and `body` on a connection of its own.
fn send(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> String {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes)
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[test]
fn skopeo_pushes_into_gantry_serve_and_gantry_pulls_it_back() {
    if !peers() {
        return;
    }
    let server_store = Gantry::new();
    let srv = server_store.serve(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::create(dir.path());
    let (m, _) = layout.image(&Image::new(rich_layers()));
    layout.tag("v1", &m, None);
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", dir.path().display()),
        &format!("docker://{}/team/app:v1", srv.addr),
    ]);
    // A second repository: skopeo mounts what the registry already has.
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", dir.path().display()),
        &format!("docker://{}/team/copy:v1", srv.addr),
    ]);
    let inspected: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/team/app:v1", srv.addr),
    ]))
    .unwrap();
    assert_eq!(
        inspected["Digest"],
        m.digest.as_str(),
        "the pushed manifest, byte for byte"
    );
    let catalog = get(&srv.addr, "/v2/_catalog");
    assert!(
        catalog.contains("\"team/app\"") && catalog.contains("\"team/copy\""),
        "{catalog}"
    );

    let g = Gantry::new();
    let name = format!("{}/team/copy:v1", srv.addr);
    g.ok(&["pull", &name]);
    assert_export_matches_umoci(&g, &name, dir.path(), "v1");
    g.fsck_clean();
}

#[test]
fn gantry_serve_refuses_bad_pushes_and_keeps_nothing_of_them() {
    if !peers() {
        return;
    }
    let g = Gantry::new();
    let srv = g.serve(&[]);
    let a = srv.addr.clone();

    // A session: started, a chunk out of order refused, chunks in order kept.
    let r = send(&a, "POST", "/v2/team/app/blobs/uploads/", &[], b"");
    assert_eq!(status(&r), 202, "{r}");
    let loc = header(&r, "location").unwrap().to_string();
    assert_eq!(header(&r, "range"), Some("0-0"));
    let r = send(&a, "PATCH", &loc, &[("Content-Range", "5-9")], b"world");
    assert_eq!(status(&r), 416, "{r}");
    assert_eq!(error_code(&r), "BLOB_UPLOAD_INVALID");
    let r = send(&a, "PATCH", &loc, &[("Content-Range", "0-4")], b"hello");
    assert_eq!((status(&r), header(&r, "range")), (202, Some("0-4")), "{r}");
    // A session is its repository's alone.
    let other = loc.replace("/team/app/", "/team/other/");
    let r = send(&a, "PATCH", &other, &[], b"x");
    assert_eq!(
        (status(&r), error_code(&r).as_str()),
        (404, "BLOB_UPLOAD_UNKNOWN"),
        "{r}"
    );
    let r = get(&a, &loc);
    assert_eq!((status(&r), header(&r, "range")), (204, Some("0-4")), "{r}");
    // A wrong digest: refused, the blob never visible, the session gone.
    let wrong = sha256(b"something else");
    let r = send(&a, "PUT", &format!("{loc}?digest={wrong}"), &[], b" world");
    assert_eq!((status(&r), error_code(&r).as_str()), (400, "DIGEST_INVALID"), "{r}");
    assert_eq!(status(&get(&a, &format!("/v2/team/app/blobs/{wrong}"))), 404);
    assert_eq!(status(&get(&a, &loc)), 404, "a failed session is gone");

    // A connection cut halfway through a chunk: what arrived is kept, the
    // client asks how far it got and sends the rest.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = sha256(&data);
    let r = send(&a, "POST", "/v2/team/app/blobs/uploads/", &[], b"");
    let loc = header(&r, "location").unwrap().to_string();
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&a).unwrap();
        let head = format!(
            "PATCH {loc} HTTP/1.1\r\nHost: {a}\r\nContent-Range: 0-{}\r\nContent-Length: {}\r\n\r\n",
            data.len() - 1,
            data.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&data[..120_000]).unwrap();
        s.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let mut got = 0;
    for _ in 0..50 {
        let r = get(&a, &loc);
        got = header(&r, "range")
            .and_then(|r| r.split('-').nth(1))
            .and_then(|e| e.parse::<usize>().ok())
            .map(|e| e + 1)
            .unwrap_or(0);
        if got == 120_000 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(got, 120_000, "the bytes that arrived are kept");
    let r = send(
        &a,
        "PATCH",
        &loc,
        &[("Content-Range", &format!("{got}-{}", data.len() - 1))],
        &data[got..],
    );
    assert_eq!(status(&r), 202, "{r}");
    let r = send(&a, "PUT", &format!("{loc}?digest={digest}"), &[], b"");
    assert_eq!(status(&r), 201, "{r}");
    assert_eq!(header(&r, "docker-content-digest"), Some(digest.as_str()));
    let r = get(&a, &format!("/v2/team/app/blobs/{digest}"));
    assert_eq!(status(&r), 200);

    // A monolithic upload, then a mount into another repository.
    let small = b"{\"architecture\":\"amd64\",\"os\":\"linux\",\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}";
    let config = sha256(small);
    let r = send(
        &a,
        "POST",
        &format!("/v2/team/app/blobs/uploads/?digest={config}"),
        &[],
        small,
    );
    assert_eq!(status(&r), 201, "{r}");
    let r = send(
        &a,
        "POST",
        &format!("/v2/team/mounted/blobs/uploads/?mount={digest}&from=team/app"),
        &[],
        b"",
    );
    assert_eq!(status(&r), 201, "mounted: {r}");
    let r = send(
        &a,
        "POST",
        &format!("/v2/team/mounted/blobs/uploads/?mount={digest}&from=team/nothing"),
        &[],
        b"",
    );
    assert_eq!(status(&r), 202, "not mountable: a session instead: {r}");

    // Manifests: one naming a missing blob is refused; a good one stored;
    // one over 4 MiB refused.
    let manifest = |layer: &str| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": small.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": data.len()}],
        }))
        .unwrap()
    };
    let ct = [("Content-Type", "application/vnd.oci.image.manifest.v1+json")];
    let missing = sha256(b"missing");
    let r = send(&a, "PUT", "/v2/team/app/manifests/v1", &ct, &manifest(&missing));
    assert_eq!(
        (status(&r), error_code(&r).as_str()),
        (400, "MANIFEST_BLOB_UNKNOWN"),
        "{r}"
    );
    assert_eq!(status(&get(&a, "/v2/team/app/manifests/v1")), 404);
    let good = manifest(&digest);
    let r = send(&a, "PUT", "/v2/team/app/manifests/v1", &ct, &good);
    assert_eq!(status(&r), 201, "{r}");
    assert_eq!(header(&r, "docker-content-digest"), Some(sha256(&good).as_str()));
    let big = vec![b' '; (4 << 20) + 1];
    let r = send(&a, "PUT", "/v2/team/app/manifests/big", &ct, &big);
    assert_eq!(status(&r), 413, "{r}");
    // A manifest PUT by digest must be that digest.
    let r = send(&a, "PUT", &format!("/v2/team/app/manifests/{missing}"), &ct, &good);
    assert_eq!((status(&r), error_code(&r).as_str()), (400, "DIGEST_INVALID"), "{r}");

    // Delete by digest: the manifest and its tag go.
    let md = sha256(&good);
    let r = send(&a, "DELETE", &format!("/v2/team/app/manifests/{md}"), &[], b"");
    assert_eq!(status(&r), 202, "{r}");
    assert_eq!(status(&get(&a, "/v2/team/app/manifests/v1")), 404);
}

#[test]
fn gantry_serve_with_htpasswd_lets_only_its_users_push() {
    if !peers() {
        return;
    }
    let g = Gantry::new();
    let file = g.scratch().join("htpasswd");
    std::fs::write(&file, format!("alice:{}\n", bcrypt::hash("s3cret", 4).unwrap())).unwrap();
    let srv = g.serve(&["--htpasswd", file.to_str().unwrap()]);
    let a = srv.addr.clone();
    let r = send(&a, "POST", "/v2/team/app/blobs/uploads/", &[], b"");
    assert_eq!((status(&r), error_code(&r).as_str()), (401, "UNAUTHORIZED"), "{r}");
    assert!(header(&r, "www-authenticate").is_some_and(|h| h.starts_with("Basic")));
    let wrong = basic("alice", "nope");
    let r = send(
        &a,
        "POST",
        "/v2/team/app/blobs/uploads/",
        &[("Authorization", &wrong)],
        b"",
    );
    assert_eq!(status(&r), 401);
    let right = basic("alice", "s3cret");
    let r = send(
        &a,
        "POST",
        "/v2/team/app/blobs/uploads/",
        &[("Authorization", &right)],
        b"",
    );
    assert_eq!(status(&r), 202, "{r}");
    // `/v2/` challenges (that is how clients learn to send credentials)…
    assert_eq!(status(&get(&a, "/v2/")), 401);
    assert_eq!(status(&send(&a, "GET", "/v2/", &[("Authorization", &right)], b"")), 200);

    // skopeo with the credentials pushes; without them it is refused.
    let dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::create(dir.path());
    let (m, _) = layout.image(&crate::control_image());
    layout.tag("v1", &m, None);
    let src = format!("oci:{}:v1", dir.path().display());
    let dst = format!("docker://{a}/team/app:v1");
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", &src, &dst])
        .output()
        .unwrap();
    assert!(!out.status.success(), "pushed without credentials");
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--dest-creds",
        "alice:s3cret",
        &src,
        &dst,
    ]);
    // …but reads stay open.
    assert_eq!(status(&get(&a, "/v2/team/app/manifests/v1")), 200);
    assert_eq!(status(&get(&a, &format!("/v2/team/app/blobs/{}", m.digest))), 200);
}

/// Lines of a registry log that are requests of `method` to `path_part`.
fn requests(log: &str, method: &str, path_part: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(&format!("\"{method} ")) && l.contains(path_part))
        .count()
}

/// The manifest digest `skopeo copy` wrote into an OCI layout at `dir`.
fn copied_digest(dir: &std::path::Path) -> String {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_string()
}

#[test]
fn gantry_pushes_to_docker_registry_mounting_what_the_registry_has() {
    if !peers() {
        return;
    }
    let reg = Registry::start_logged();
    let (_p, m, layers) = crate::publish(&reg, "team/app", "v1", &Image::new(rich_layers()));
    let g = Gantry::new();
    let from = format!("{}/team/app:v1", reg.addr());
    let to = format!("{}/team/copy:v1", reg.addr());
    g.ok(&["pull", &from]);
    g.ok(&["tag", &from, &to]);
    let out = g.ok(&["push", &to]);
    assert!(
        out.starts_with(&format!("The push refers to repository [{}/team/copy]", reg.addr())),
        "{out}"
    );
    assert_eq!(out.matches(": Mounted from team/app").count(), layers.len(), "{out}");
    let last = out.lines().last().unwrap();
    assert!(last.starts_with(&format!("v1: digest: {} size: ", m.digest)), "{out}");
    // Nothing was uploaded: every blob (config too) was mounted.
    let log = reg.log();
    assert_eq!(requests(&log, "PATCH", "/v2/team/copy/"), 0, "{log}");
    assert_eq!(requests(&log, "PUT", "/v2/team/copy/blobs/"), 0, "{log}");
    assert!(
        requests(&log, "POST", "/v2/team/copy/blobs/uploads/?mount=") > layers.len(),
        "{log}"
    );

    // A real client reads the same manifest; its tree is gantry's.
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("copy");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{to}"),
        &format!("oci:{}:v1", layout.display()),
    ]);
    assert_eq!(copied_digest(&layout), m.digest);
    assert_export_matches_umoci(&g, &to, &layout, "v1");

    // Pushed again: every layer is already there.
    let again = g.ok(&["push", &to]);
    assert_eq!(again.matches(": Layer already exists").count(), layers.len(), "{again}");
    // Every tag of the repository at once.
    let v2 = format!("{}/team/copy:v2", reg.addr());
    g.ok(&["tag", &from, &v2]);
    let all = g.ok(&["push", "--all-tags", &format!("{}/team/copy", reg.addr())]);
    let digests: Vec<&str> = all.lines().filter(|l| l.contains(": digest: ")).collect();
    assert_eq!(digests.len(), 2, "{all}");
    assert!(
        digests[0].starts_with("v1: digest: ") && digests[1].starts_with("v2: digest: "),
        "{all}"
    );
    // A reference gantry does not have is named plainly.
    let missing = format!("{}/team/none:v1", reg.addr());
    let err = g.fails(&["push", &missing]);
    assert!(
        err.contains("does not exist locally") && err.contains("team/none:v1"),
        "{err}"
    );
    g.fsck_clean();
}

#[test]
fn a_loaded_image_is_pushed_from_its_layers_and_reads_back_the_same() {
    if !(peers() && gantry_tests::require("umoci")) {
        return;
    }
    let reg = Registry::start_logged();
    let dir = tempfile::tempdir().unwrap();
    let layout_dir = dir.path().join("layout");
    let mut layout = Layout::create(&layout_dir);
    let (m, _) = layout.image(&Image::new(rich_layers()));
    layout.tag("v1", &m, None);
    let archive = dir.path().join("docker.tar");
    let name = format!("{}/team/loaded:v1", reg.addr());
    skopeo(&[
        "copy",
        "--quiet",
        &format!("oci:{}:v1", layout_dir.display()),
        &format!("docker-archive:{}:{name}", archive.display()),
    ]);
    let g = Gantry::new();
    g.ok(&["load", "-i", archive.to_str().unwrap()]);
    let out = g.ok(&["push", &name]);
    assert!(out.contains(": Pushed"), "{out}");
    let back = dir.path().join("back");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{name}"),
        &format!("oci:{}:v1", back.display()),
    ]);
    // Same tree, same image (config) as what was loaded.
    assert_export_matches_umoci(&g, &name, &back, "v1");
    let inspected: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", &name])).unwrap();
    let id = inspected[0]["Id"].as_str().unwrap().to_string();
    let pulled = Gantry::new();
    pulled.ok(&["pull", &name]);
    let again: serde_json::Value = serde_json::from_str(&pulled.ok(&["inspect", &name])).unwrap();
    assert_eq!(
        again[0]["Id"].as_str().unwrap(),
        id,
        "the image ID survives load → push → pull"
    );
    // A second store that pulled it, pushed elsewhere, mounts (the v2
    // metadata of the pull names the source repository).
    let other = format!("{}/team/other:v1", reg.addr());
    pulled.ok(&["tag", &name, &other]);
    let out = pulled.ok(&["push", &other]);
    assert!(out.contains(": Mounted from team/loaded"), "{out}");
}

/// One layer of incompressible bytes (so a cut lands mid-blob).
fn noisy_image(len: usize) -> Image {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            // xorshift64*: bytes gzip cannot shrink.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect();
    Image::new(vec![gantry_tests::image::Layer::new()
        .file("noise", 0o644, &data)
        .tar()])
}

#[test]
fn a_cut_upload_resumes_and_a_killed_push_continues_where_it_stopped() {
    if !peers() {
        return;
    }
    use gantry_tests::relay::{Break, Relay};
    let server = Gantry::new();
    let srv = server.serve(&[]);
    let dir = tempfile::tempdir().unwrap();
    let layout_dir = dir.path().join("layout");
    let mut layout = Layout::create(&layout_dir);
    let size = 3 << 20;
    let (m, _) = layout.image(&noisy_image(size));
    layout.tag("v1", &m, None);
    let archive = dir.path().join("oci.tar");
    skopeo(&[
        "copy",
        "--quiet",
        &format!("oci:{}:v1", layout_dir.display()),
        &format!("oci-archive:{}:x/y:v1", archive.display()),
    ]);

    // Cut twice, 1 MiB into a connection: the push asks how far the
    // registry got and sends the rest.
    let relay = Relay::start(&srv.addr, 1 << 20, 2, Break::Cut);
    let g = Gantry::new();
    g.ok(&["load", "-i", archive.to_str().unwrap()]);
    let name = format!("{}/team/cut:v1", relay.addr());
    g.ok(&["tag", "x/y:v1", &name]);
    let out = g.ok(&["push", &name]);
    assert!(out.contains(": Pushed"), "{out}");
    let sent = relay.upstream_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sent < (size as u64) * 13 / 10,
        "resumed, not restarted: {sent} bytes for {size}"
    );
    assert!(
        requests_in(&srv.log(), "PATCH", "/v2/team/cut/blobs/uploads/") >= 3,
        "{}",
        srv.log()
    );

    // Killed while stalled halfway; run again, it continues the session.
    let stall = Relay::start(&srv.addr, 2 << 20, 1, Break::Stall);
    let name = format!("{}/team/killed:v1", stall.addr());
    g.ok(&["tag", "x/y:v1", &name]);
    let mut child = g.spawn(&["push", &name]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while stall.upstream_bytes.load(std::sync::atomic::Ordering::Relaxed) < (2 << 20) {
        assert!(std::time::Instant::now() < deadline, "the push never got halfway");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    let before = stall.upstream_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let out = g.ok(&["push", &name]);
    assert!(out.contains(": Pushed"), "{out}");
    let rerun = stall.upstream_bytes.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(
        rerun < (size as u64) * 6 / 10,
        "the rerun sent only what was missing: {rerun} of {size}"
    );
    assert_eq!(
        requests_in(&srv.log(), "POST", "/v2/team/killed/blobs/uploads/"),
        2,
        "one session for the layer, one for the config: {}",
        srv.log()
    );
    // What arrived is the image.
    let back = Gantry::new();
    let direct = format!("{}/team/killed:v1", srv.addr);
    back.ok(&["pull", &direct]);
    back.fsck_clean();
}

/// Lines of gantry serve's access log for `method` on paths containing `part`.
fn requests_in(log: &str, method: &str, part: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(&format!("\"{method} ")) && l.contains(part))
        .count()
}

#[test]
fn two_pushes_of_one_repository_upload_each_blob_once() {
    if !peers() {
        return;
    }
    let src = Registry::start();
    let (_p, m, layers) = crate::publish(&src, "team/app", "v1", &Image::new(rich_layers()));
    let dst = Registry::start_logged();
    let g = Gantry::new();
    let from = format!("{}/team/app:v1", src.addr());
    let to = format!("{}/team/app:v1", dst.addr());
    g.ok(&["pull", &from]);
    g.ok(&["tag", &from, &to]);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| g.run(&["push", &to]));
        let b = s.spawn(|| g.run(&["push", &to]));
        (a.join().unwrap(), b.join().unwrap())
    });
    for r in [&a, &b] {
        assert!(r.out.status.success(), "{}", r.stderr());
        assert!(
            r.stdout().contains(&format!("v1: digest: {}", m.digest)),
            "{}",
            r.stdout()
        );
    }
    let log = dst.log();
    // Each blob's upload ends with one PUT: the layers and the config, once.
    assert_eq!(
        requests(&log, "PUT", "/v2/team/app/blobs/uploads/"),
        layers.len() + 1,
        "{log}"
    );
}

/// The store's listing without push bookkeeping (`push/`: locks and
/// remembered upload sessions, which are how a push resumes).
fn listing_without_push(g: &Gantry) -> Vec<String> {
    g.store_listing()
        .into_iter()
        .filter(|l| !l.starts_with("push/"))
        .collect()
}

#[test]
fn a_failed_push_is_one_line_and_changes_no_image() {
    let Some((reg, g)) = crate::control_store() else { return };
    let from = format!("{}/test/control:v1", reg.addr());
    // Nothing listens there.
    let to = format!("127.0.0.1:{}/team/x:v1", gantry_tests::registry::free_port());
    g.ok(&["tag", &from, &to]);
    let before = listing_without_push(&g);
    let r = g.run(&["push", &to]);
    assert!(!r.out.status.success());
    let err = r.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: pushing ") && lines[0].contains("team/x:v1"),
        "{err}"
    );
    assert_eq!(before, listing_without_push(&g), "a failed push changed the store");
    g.fsck_clean();

    // A transport that cannot push (it exports no push interface) is named.
    let bad = Gantry::bare().with_config(&format!(
        "[transport]\ntype = \"bad\"\npath = \"{}\"\n[driver]\ntype = \"{}\"\n",
        crate::sandbox::component("gantry_bad_transport").display(),
        Gantry::test_driver()
    ));
    let err = bad.fails(&["push", &from]);
    assert!(err.contains("transport bad cannot push"), "{err}");
}

#[test]
fn gantry_pushes_with_credentials_to_a_gantry_serve_that_requires_them() {
    let Some((reg, g)) = crate::control_store() else { return };
    let server = Gantry::new();
    let file = server.scratch().join("htpasswd");
    std::fs::write(&file, format!("alice:{}\n", bcrypt::hash("s3cret", 4).unwrap())).unwrap();
    let srv = server.serve(&["--htpasswd", file.to_str().unwrap()]);
    let from = format!("{}/test/control:v1", reg.addr());
    let to = format!("{}/team/private:v1", srv.addr);
    g.ok(&["tag", &from, &to]);
    // Without credentials: refused, one line.
    let err = g.fails(&["push", &to]);
    assert!(
        err.contains("unauthorized") || err.contains("authentication required"),
        "{err}"
    );
    // With them (a Docker config.json), it goes through.
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let auth_file = g.scratch().join("auth.json");
    std::fs::write(
        &auth_file,
        serde_json::json!({"auths": {srv.addr.clone(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let g = g.with_config(&format!(
        "auth_file = \"{}\"\n[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n",
        auth_file.display(),
        Gantry::test_driver()
    ));
    let out = g.ok(&["push", &to]);
    assert!(out.lines().last().unwrap().starts_with("v1: digest: sha256:"), "{out}");
    let back = Gantry::new();
    back.ok(&["pull", &to]);
}

/// `GET path` on a connection of its own: the status and the body's bytes
/// exactly (blobs are not text).
fn get_bytes(addr: &str, path: &str) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("an answer head");
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    (status(&head), out[end + 4..].to_vec())
}

/// Bytes no two offsets of which repeat in a short cycle.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A tmpfs mounted at a directory for as long as this lives.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `None` (saying why) where this process may not mount one.
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        if !gantry_tests::is_root() {
            eprintln!("skipped: mounting a small tmpfs (a full disk) needs root");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: this machine refuses to mount a tmpfs");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The offset an upload session reports (`Range: 0-N` is N+1 bytes; `0-0`
/// may be none).
fn session_offset(addr: &str, loc: &str) -> usize {
    let r = get(addr, loc);
    assert_eq!(status(&r), 204, "{r}");
    header(&r, "range")
        .and_then(|r| r.split('-').nth(1))
        .and_then(|e| e.parse::<usize>().ok())
        .map(|e| e + 1)
        .unwrap()
}

#[test]
fn a_full_disk_mid_chunk_leaves_no_blob_whose_bytes_differ_from_its_digest() {
    let g = Gantry::new();
    let registry = g.root_path().join("registry");
    // 8 MiB of disk, 5 of them taken: a 3 MiB chunk after 1 MiB fails halfway.
    let Some(_disk) = Tmpfs::mount(&registry, "8m") else {
        return;
    };
    let filler = registry.join("filler");
    std::fs::write(&filler, vec![7u8; 5 << 20]).unwrap();
    let srv = g.serve(&[]);
    let a = srv.addr.clone();
    let data = noise(4 << 20, 19);
    let digest = sha256(&data);
    let mib = 1 << 20;

    let r = send(&a, "POST", "/v2/team/app/blobs/uploads/", &[], b"");
    let loc = header(&r, "location").unwrap().to_string();
    let r = send(
        &a,
        "PATCH",
        &loc,
        &[("Content-Range", &format!("0-{}", mib - 1))],
        &data[..mib],
    );
    assert_eq!(status(&r), 202, "{r}");
    let r = send(
        &a,
        "PATCH",
        &loc,
        &[("Content-Range", &format!("{mib}-{}", data.len() - 1))],
        &data[mib..],
    );
    assert_ne!(status(&r), 202, "the disk was full: {r}");

    // Space comes back; the client resumes where the server says it is.
    std::fs::remove_file(&filler).unwrap();
    let offset = session_offset(&a, &loc);
    assert!(offset <= data.len(), "{offset}");
    let r = send(
        &a,
        "PATCH",
        &loc,
        &[("Content-Range", &format!("{offset}-{}", data.len() - 1))],
        &data[offset..],
    );
    assert_eq!(status(&r), 202, "{r}");
    let r = send(&a, "PUT", &format!("{loc}?digest={digest}"), &[], b"");
    let put = status(&r);
    let (got, bytes) = get_bytes(&a, &format!("/v2/team/app/blobs/{digest}"));
    if got == 200 {
        assert_eq!(
            sha256(&bytes),
            digest,
            "served as {digest} with {} bytes that hash otherwise (PUT answered {put})",
            bytes.len()
        );
    }
    // The session was kept in step with its file: the upload completes.
    assert_eq!((put, got), (201, 200), "{r}");
    assert_eq!(bytes, data);
}

#[test]
fn a_pushed_manifest_is_the_kind_its_media_type_says_and_served_with_a_safe_type() {
    let g = Gantry::new();
    let srv = g.serve(&[]);
    let a = srv.addr.clone();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = sha256(config);
    let layer = noise(1000, 3);
    let layer_digest = sha256(&layer);
    for (d, b) in [(&config_digest, &config[..]), (&layer_digest, &layer[..])] {
        let r = send(&a, "POST", &format!("/v2/team/app/blobs/uploads/?digest={d}"), &[], b);
        assert_eq!(status(&r), 201, "{r}");
    }
    let oci_manifest = "application/vnd.oci.image.manifest.v1+json";
    let oci_index = "application/vnd.oci.image.index.v1+json";
    let manifest = |layer: &str| {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci_manifest,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 1000}],
        })
    };
    let put = |reference: &str, content_type: &str, doc: &serde_json::Value| {
        let bytes = serde_json::to_vec(doc).unwrap();
        send(
            &a,
            "PUT",
            &format!("/v2/team/app/manifests/{reference}"),
            &[("Content-Type", content_type)],
            &bytes,
        )
    };
    let missing = sha256(b"not held");
    let refused = |r: &str, what: &str| {
        assert_eq!(status(r), 400, "{what}: {r}");
        assert_eq!(error_code(r), "MANIFEST_INVALID", "{what}: {r}");
    };

    // Naming a blob the repository lacks: refused, with or without an
    // extra `"manifests": []` (that does not make an image an index).
    let r = put("v1", oci_manifest, &manifest(&missing));
    assert_eq!(error_code(&r), "MANIFEST_BLOB_UNKNOWN", "{r}");
    let mut smuggled = manifest(&missing);
    smuggled["manifests"] = serde_json::json!([]);
    refused(&put("v1", oci_manifest, &smuggled), "manifest with manifests: []");
    refused(&put("v1", oci_index, &smuggled), "served as an index");
    let mut as_index = smuggled.clone();
    as_index["mediaType"] = serde_json::json!(oci_index);
    refused(&put("v1", oci_index, &as_index), "an index with layers");
    assert_eq!(status(&get(&a, "/v2/team/app/manifests/v1")), 404);

    // The media type and Content-Type must agree, and be a manifest's.
    let good = manifest(&layer_digest);
    refused(&put("v1", oci_index, &good), "Content-Type contradicting mediaType");
    let mut bare = good.clone();
    bare.as_object_mut().unwrap().remove("mediaType");
    refused(&put("page", "text/html", &bare), "text/html");
    let r = get(&a, "/v2/team/app/manifests/page");
    assert_eq!(status(&r), 404, "{r}");

    let r = put("v1", oci_manifest, &good);
    assert_eq!(status(&r), 201, "{r}");
    let r = put("bare", oci_manifest, &bare);
    assert_eq!(status(&r), 201, "no mediaType: the Content-Type says it: {r}");
    for path in ["/v2/team/app/manifests/v1", "/v2/team/app/manifests/bare"] {
        let r = get(&a, path);
        assert_eq!(status(&r), 200, "{r}");
        assert_eq!(header(&r, "content-type"), Some(oci_manifest), "{r}");
        assert_eq!(header(&r, "x-content-type-options"), Some("nosniff"), "{r}");
    }
    // Every answer, blobs and errors too, says nosniff.
    for path in [
        format!("/v2/team/app/blobs/{layer_digest}"),
        "/v2/team/app/manifests/nothing".to_string(),
        "/v2/_catalog".to_string(),
    ] {
        let r = get(&a, &path);
        assert_eq!(header(&r, "x-content-type-options"), Some("nosniff"), "{path}: {r}");
    }
}

/// The median of `samples`, in milliseconds.
fn median_ms(mut samples: Vec<std::time::Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

#[test]
fn a_wrong_password_flood_leaves_reads_fast_and_unknown_users_cost_the_same() {
    let g = Gantry::new();
    let file = g.scratch().join("htpasswd");
    // A realistic cost: each check takes tens of milliseconds of CPU.
    std::fs::write(&file, format!("alice:{}\n", bcrypt::hash("s3cret", 10).unwrap())).unwrap();
    let srv = g.serve(&["--htpasswd", file.to_str().unwrap()]);
    let a = srv.addr.clone();
    let post = |user: &str, password: &str| {
        let auth = basic(user, password);
        let started = std::time::Instant::now();
        let r = send(
            &a,
            "POST",
            "/v2/team/app/blobs/uploads/",
            &[("Authorization", &auth)],
            b"",
        );
        (status(&r), started.elapsed())
    };

    // 16 clients hammer wrong passwords; open reads stay quick.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let reads = std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (st, _) = post("alice", "wrong");
                    assert!(st == 401 || st == 429, "{st}");
                }
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut reads = Vec::new();
        for _ in 0..20 {
            let started = std::time::Instant::now();
            let r = get(&a, "/v2/_catalog");
            assert_eq!(status(&r), 200, "{r}");
            reads.push(started.elapsed());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reads
    });
    let median = median_ms(reads);
    eprintln!("reads during the flood: {median:.1} ms median");
    assert!(median < 50.0, "reads took {median:.1} ms (median) during the flood");
    // An unknown user is refused as slowly as a known one with a wrong password.
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let (s, t) = post("alice", "wrong");
        assert_eq!(s, 401);
        known.push(t);
        let (s, t) = post("bob", "wrong");
        assert_eq!(s, 401);
        unknown.push(t);
    }
    let (known, unknown) = (median_ms(known), median_ms(unknown));
    eprintln!("refusals: {known:.1} ms for a known user, {unknown:.1} ms for an unknown one");
    assert!(
        unknown >= known / 3.0,
        "an unknown user answered in {unknown:.1} ms, a known one in {known:.1} ms"
    );

    // The right password still works after it.
    assert_eq!(post("alice", "s3cret").0, 202);
}

/// Upload sessions' directories in a registry's storage.
fn sessions_on_disk(g: &Gantry) -> usize {
    std::fs::read_dir(g.root_path().join("registry/uploads"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

#[test]
fn uploads_have_a_size_cap_and_sessions_a_count_cap_and_an_expiry() {
    let g = Gantry::new();
    let srv = g.serve(&[
        "--max-upload-size",
        "1000",
        "--max-uploads",
        "3",
        "--max-uploads-per-repo",
        "2",
        "--upload-expiry",
        "2",
    ]);
    let a = srv.addr.clone();
    let start = |repo: &str| send(&a, "POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"");

    // Over the size cap: refused, and the session goes with its bytes.
    let r = start("team/app");
    let loc = header(&r, "location").unwrap().to_string();
    let r = send(&a, "PATCH", &loc, &[], &[1u8; 600]);
    assert_eq!(status(&r), 202, "{r}");
    let r = send(&a, "PATCH", &loc, &[], &[2u8; 600]);
    assert_eq!((status(&r), error_code(&r).as_str()), (413, "SIZE_INVALID"), "{r}");
    assert_eq!(status(&get(&a, &loc)), 404, "the session is gone");
    let big = vec![3u8; 1001];
    let r = send(
        &a,
        "POST",
        &format!("/v2/team/app/blobs/uploads/?digest={}", sha256(&big)),
        &[],
        &big,
    );
    assert_eq!(status(&r), 413, "{r}");
    assert_eq!(status(&get(&a, &format!("/v2/team/app/blobs/{}", sha256(&big)))), 404);
    assert_eq!(sessions_on_disk(&g), 0, "nothing of them is left");

    // Two sessions per repository, three in all.
    for _ in 0..2 {
        assert_eq!(status(&start("team/app")), 202);
    }
    let r = start("team/app");
    assert_eq!((status(&r), error_code(&r).as_str()), (429, "TOOMANYREQUESTS"), "{r}");
    assert_eq!(status(&start("team/other")), 202);
    let r = start("team/third");
    assert_eq!((status(&r), error_code(&r).as_str()), (429, "TOOMANYREQUESTS"), "{r}");
    assert_eq!(sessions_on_disk(&g), 3);

    // Abandoned sessions expire: their files go, and new ones fit again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while sessions_on_disk(&g) > 0 {
        assert!(std::time::Instant::now() < deadline, "expired sessions stayed on disk");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(status(&start("team/app")), 202);
}
