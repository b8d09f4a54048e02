//! `gantry serve` with its storage on an object store (the S3 API): a real
//! SeaweedFS per test, replicas that share its bucket and keep nothing of
//! their own, the conformance suite, and `gantry serve gc` (on both
//! storages) while pushes go on.

use crate::peers;
use crate::serve::skopeo;
use gantry_tests::gantry::{Gantry, Server};
use gantry_tests::image::{sha256, Image, Layer, Layout};
use gantry_tests::s3::SeaweedFs;
use std::path::Path;

/// A replica: a store of its own whose serve keeps everything in `s3`'s bucket.
fn replica(s3: &SeaweedFs, extra: &str) -> (Gantry, Server) {
    let g = Gantry::new().with_config(&format!("{}{extra}", s3.config()));
    let srv = g.serve(&[]);
    (g, srv)
}

fn url(srv: &Server, path: &str) -> String {
    format!("http://{}{path}", srv.addr)
}

/// A one-layer image of `size` bytes of `seed` in a fresh OCI layout at `dir`.
fn layout(dir: &Path, seed: u8, size: usize) -> String {
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let mut l = Layout::create(dir);
    let (m, _) = l.image(&Image::new(vec![Layer::new().file("data", 0o644, &data).tar()]));
    l.tag("v1", &m, None);
    m.digest
}

fn copy_in(dir: &Path, to: &str) {
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", dir.display()),
        &format!("docker://{to}"),
    ]);
}

fn copy_out(from: &str, dir: &Path) {
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{from}"),
        &format!("oci:{}:v1", dir.display()),
    ]);
}

/// Starts an upload session; its path.
fn start(srv: &Server, repo: &str) -> String {
    let r = ureq::post(&url(srv, &format!("/v2/{repo}/blobs/uploads/")))
        .call()
        .unwrap();
    assert_eq!(r.status(), 202);
    r.header("Location").unwrap().to_string()
}

fn patch(srv: &Server, session: &str, from: usize, chunk: &[u8]) -> ureq::Response {
    ureq::request("PATCH", &url(srv, session))
        .set("Content-Type", "application/octet-stream")
        .set("Content-Range", &format!("{from}-{}", from + chunk.len() - 1))
        .send_bytes(chunk)
        .unwrap()
}

/// Ends a session as `digest`; the answer's status.
fn finish(srv: &Server, session: &str, digest: &str) -> u16 {
    let sep = if session.contains('?') { '&' } else { '?' };
    match ureq::put(&url(srv, &format!("{session}{sep}digest={digest}"))).send_bytes(b"") {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("ending {session}: {e}"),
    }
}

fn get_blob(srv: &Server, repo: &str, digest: &str) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(
        &mut ureq::get(&url(srv, &format!("/v2/{repo}/blobs/{digest}")))
            .call()
            .unwrap()
            .into_reader(),
        &mut out,
    )
    .unwrap();
    out
}

/// Both sets of the OCI conformance suite pass with the storage in a bucket.
#[test]
fn the_conformance_suite_passes_on_an_object_store() {
    let Some(bin) = crate::conformance::suite() else { return };
    let Some(s3) = SeaweedFs::start() else { return };
    let (g, srv) = replica(&s3, "");
    let out = g.scratch().join("conformance");
    std::fs::create_dir_all(&out).unwrap();
    let addr = format!("http://{}", srv.addr);
    let ((passed, failed, skipped), text) = crate::conformance::run_suite(&bin, &addr, "1.1", &out);
    assert_eq!(failed, 0, "{text}");
    assert!(passed > 800 && skipped <= 2, "{text}");
    let ((passed, failed, skipped), text) = crate::conformance::run_suite(&bin, &addr, "dev", &out);
    assert_eq!((failed, skipped), (0, 0), "{text}");
    assert!(passed > 900, "{text}");
    // Nothing of the registry's state is on the replica's disk.
    assert!(!g.root_path().join("registry").exists());
}

/// Three replicas on one bucket: an image pushed through one is pulled
/// through another with the same digest (skopeo both ways, `gantry pull`
/// with the same image ID, `gantry push` through one and podman's pull
/// through another); a chunked upload begun on one ends on
/// another, after the first was killed; a tag moved on one is what the
/// others serve at once; the same blob pushed through two at once is one
/// object; a blob whose bytes do not match its digest is never visible.
#[test]
fn replicas_on_one_bucket_serve_and_continue_each_others_work() {
    if !peers() {
        return;
    }
    let Some(s3) = SeaweedFs::start() else { return };
    let (_ga, mut a) = replica(&s3, "");
    let (_gb, b) = replica(&s3, "");
    let (_gc, c) = replica(&s3, "");
    let work = tempfile::tempdir().unwrap();

    // Push through A (7 MiB: a multipart upload), pull through B and C.
    let manifest = layout(&work.path().join("in"), 1, 7 << 20);
    copy_in(&work.path().join("in"), &format!("{}/team/app:v1", a.addr));
    copy_out(&format!("{}/team/app:v1", b.addr), &work.path().join("out"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("out/index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], manifest.as_str());
    let puller = Gantry::new();
    puller.ok(&["pull", &format!("{}/team/app:v1", c.addr)]);
    let pusher = Gantry::new();
    pusher.ok(&["pull", &format!("{}/team/app:v1", a.addr)]);
    let id = |g: &Gantry, r: &str| {
        serde_json::from_str::<serde_json::Value>(&g.ok(&["inspect", r])).unwrap()[0]["Id"].clone()
    };
    assert_eq!(
        id(&puller, &format!("{}/team/app:v1", c.addr)),
        id(&pusher, &format!("{}/team/app:v1", a.addr))
    );
    // `gantry push` through B, podman pulls it through C.
    pusher.ok(&[
        "tag",
        &format!("{}/team/app:v1", a.addr),
        &format!("{}/team/pushed:v2", b.addr),
    ]);
    pusher.ok(&["push", &format!("{}/team/pushed:v2", b.addr)]);
    crate::serve::podman_pull(&format!("{}/team/pushed:v2", c.addr));

    // A chunked upload: 6 MiB on A (a part goes to the bucket, the rest
    // waits in the session's tail), A killed, the client asks B how far it
    // got, sends the rest there and ends it on C.
    let blob: Vec<u8> = (0..(13usize << 20)).map(|i| (i % 251) as u8).collect();
    let digest = sha256(&blob);
    let session = start(&a, "team/chunked");
    let r = patch(&a, &session, 0, &blob[..6 << 20]);
    assert_eq!(r.header("Range"), Some(format!("0-{}", (6 << 20) - 1).as_str()));
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let status = ureq::get(&url(&b, &session)).call().unwrap();
    assert_eq!(status.status(), 204);
    assert_eq!(status.header("Range"), Some(format!("0-{}", (6 << 20) - 1).as_str()));
    // A chunk that does not start where the session ends is refused.
    let wrong = ureq::request("PATCH", &url(&b, &session))
        .set("Content-Range", "5-9")
        .send_bytes(b"12345");
    assert!(matches!(wrong, Err(ureq::Error::Status(416, _))), "{wrong:?}");
    patch(&b, &session, 6 << 20, &blob[6 << 20..]);
    assert_eq!(finish(&c, &session, &digest), 201);
    assert_eq!(get_blob(&b, "team/chunked", &digest), blob);
    assert!(
        s3.keys("_uploads/").is_empty(),
        "a finished session leaves nothing: {:?}",
        s3.keys("_uploads/")
    );

    // A session whose bytes are not its digest: nothing becomes visible.
    let session = start(&b, "team/bad");
    patch(&b, &session, 0, b"not what the digest says");
    let wrong = sha256(b"something else");
    assert_eq!(finish(&c, &session, &wrong), 400);
    assert!(s3.keys(&format!("blobs/sha256/{}", &wrong[7..])).is_empty());
    assert!(s3
        .keys(&format!("blobs/sha256/{}", &sha256(b"not what the digest says")[7..]))
        .is_empty());

    // A session's tail changed behind its back (another request's, a
    // store that lost a write): refused, nothing visible.
    // 9 MiB: a part in the multipart upload, 1 MiB in the tail.
    let session = start(&b, "team/tail");
    let hashed: Vec<u8> = (0..(9usize << 20)).map(|i| (i % 239) as u8).collect();
    patch(&b, &session, 0, &hashed);
    let uuid = session.rsplit('/').next().unwrap();
    let mut other = hashed[8 << 20..].to_vec();
    other[0] ^= 0xff;
    s3.put(&format!("_uploads/{uuid}/tail"), &other);
    assert_ne!(finish(&c, &session, &sha256(&hashed)), 201);
    assert!(s3.keys(&format!("blobs/sha256/{}", &sha256(&hashed)[7..])).is_empty());

    // A repository inside another's name, in either order: both listed,
    // both served.
    let nested = layout(&work.path().join("nested"), 5, 1000);
    copy_in(&work.path().join("nested"), &format!("{}/team/app/cache:v1", b.addr));
    copy_in(&work.path().join("nested"), &format!("{}/team/lib/cache:v1", b.addr));
    copy_in(&work.path().join("nested"), &format!("{}/team/lib:v1", b.addr));
    let catalog = ureq::get(&url(&c, "/v2/_catalog"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for name in ["team/app", "team/app/cache", "team/lib", "team/lib/cache"] {
        assert!(catalog.contains(&format!("\"{name}\"")), "{name}: {catalog}");
        let tags = ureq::get(&url(&c, &format!("/v2/{name}/tags/list")))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        assert!(tags.contains("\"v1\""), "{name}: {tags}");
    }
    let head = ureq::head(&url(&c, "/v2/team/app/cache/manifests/v1"))
        .set("Accept", "application/vnd.oci.image.manifest.v1+json")
        .call()
        .unwrap();
    assert_eq!(head.header("Docker-Content-Digest"), Some(nested.as_str()));

    // A tag moved on B is what C serves straight after.
    let second = layout(&work.path().join("in2"), 2, 1000);
    copy_in(&work.path().join("in2"), &format!("{}/team/app:v1", b.addr));
    let head = ureq::head(&url(&c, "/v2/team/app/manifests/v1"))
        .set("Accept", "application/vnd.oci.image.manifest.v1+json")
        .call()
        .unwrap();
    assert_eq!(head.header("Docker-Content-Digest"), Some(second.as_str()));

    // The same blob through B and C at once: one object, both answers 201.
    let same: Vec<u8> = (0..(9usize << 20)).map(|i| (i % 241) as u8).collect();
    let same_digest = sha256(&same);
    let pushes: Vec<_> = [&b, &c]
        .into_iter()
        .map(|srv| {
            let (addr, same, d) = (srv.addr.clone(), same.clone(), same_digest.clone());
            std::thread::spawn(move || {
                let r = ureq::post(&format!("http://{addr}/v2/team/same/blobs/uploads/"))
                    .call()
                    .unwrap();
                let loc = r.header("Location").unwrap().to_string();
                ureq::request("PATCH", &format!("http://{addr}{loc}"))
                    .send_bytes(&same)
                    .unwrap();
                ureq::put(&format!("http://{addr}{loc}?digest={d}"))
                    .send_bytes(b"")
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for p in pushes {
        assert_eq!(p.join().unwrap(), 201);
    }
    assert_eq!(s3.keys(&format!("blobs/sha256/{}", &same_digest[7..])).len(), 1);
    assert_eq!(get_blob(&c, "team/same", &same_digest), same);
}

/// `gantry serve gc` on both storages: what no tag names goes, what the
/// tags name stays, a dry run removes nothing, and pushes that run while
/// it collects all pull whole afterwards.
#[test]
fn gc_removes_what_nothing_names_while_pushes_go_on() {
    if !peers() {
        return;
    }
    let s3 = SeaweedFs::start();
    let mut configs = vec![String::new()];
    if let Some(s3) = &s3 {
        configs.push(s3.config());
    }
    for config in configs {
        let g = Gantry::new().with_config(&format!("[serve]\ngc_grace_seconds = 2\n{config}"));
        let srv = g.serve(&[]);
        let work = tempfile::tempdir().unwrap();
        let kept = layout(&work.path().join("kept"), 3, 4096);
        copy_in(&work.path().join("kept"), &format!("{}/gc/kept:v1", srv.addr));
        // An image whose tag is then deleted, and a blob nothing names.
        layout(&work.path().join("old"), 4, 4096);
        copy_in(&work.path().join("old"), &format!("{}/gc/old:v1", srv.addr));
        let orphan = b"a blob no manifest names".to_vec();
        let session = start(&srv, "gc/orphan");
        patch(&srv, &session, 0, &orphan);
        assert_eq!(finish(&srv, &session, &sha256(&orphan)), 201);
        let del = ureq::delete(&url(&srv, "/v2/gc/old/manifests/v1")).call().unwrap();
        assert_eq!(del.status(), 202);
        std::thread::sleep(std::time::Duration::from_secs(3));

        let dry = g.ok(&["serve", "gc", "--dry-run", "--delete-untagged"]);
        assert!(dry.contains("would remove 4 blobs"), "{dry}");
        assert_eq!(get_blob(&srv, "gc/orphan", &sha256(&orphan)), orphan);

        // Pushes of new images go on through the collection.
        let addr = srv.addr.clone();
        let dirs = work.path().to_path_buf();
        let pushing = std::thread::spawn(move || {
            for i in 0..6u8 {
                let d = dirs.join(format!("new{i}"));
                layout(&d, 10 + i, 200_000);
                copy_in(&d, &format!("{addr}/gc/new{i}:v1"));
            }
        });
        let mut report = String::new();
        for _ in 0..3 {
            report = g.ok(&["serve", "gc", "--delete-untagged"]);
        }
        pushing.join().unwrap();
        assert!(report.contains("removed"), "{report}");
        let gone = ureq::get(&url(&srv, &format!("/v2/gc/orphan/blobs/{}", sha256(&orphan)))).call();
        assert!(matches!(gone, Err(ureq::Error::Status(404, _))), "{config}: {gone:?}");
        let old = ureq::get(&url(&srv, "/v2/gc/old/tags/list"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        assert!(old.contains("\"tags\":[]"), "{old}");
        copy_out(&format!("{}/gc/kept:v1", srv.addr), &work.path().join("kept-out"));
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(work.path().join("kept-out/index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], kept.as_str());
        for i in 0..6 {
            copy_out(
                &format!("{}/gc/new{i}:v1", srv.addr),
                &work.path().join(format!("new{i}-out")),
            );
        }
        // A collection now finds nothing more to take.
        let again = g.ok(&["serve", "gc", "--delete-untagged"]);
        assert!(again.starts_with("removed 0 blobs"), "{again}");
    }
}

/// 64 clients pulling a 200 MiB blob from the bucket at once, reading
/// slowly (the case that would fill a replica's memory if it read ahead
/// of its clients): the replica's peak RSS stays under 128 MiB, and each
/// client gets the blob whole.
#[test]
fn a_replica_streams_big_blobs_to_many_slow_clients_in_little_memory() {
    let Some(s3) = SeaweedFs::start() else { return };
    let (_g, srv) = replica(&s3, "");
    let blob: Vec<u8> = (0..(200usize << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let digest = sha256(&blob);
    let session = start(&srv, "big/blob");
    ureq::request("PATCH", &url(&srv, &session)).send_bytes(&blob).unwrap();
    assert_eq!(finish(&srv, &session, &digest), 201);
    drop(blob);
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let u = url(&srv, &format!("/v2/big/blob/blobs/{digest}"));
            std::thread::spawn(move || {
                let r = ureq::get(&u).call().unwrap();
                let mut reader = r.into_reader();
                let mut h = <sha2::Sha256 as sha2::Digest>::new();
                let mut buf = vec![0u8; 64 << 10];
                let mut got = 0usize;
                loop {
                    let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    sha2::Digest::update(&mut h, &buf[..n]);
                    got += n;
                    // Slow readers first, then at full speed.
                    if got < (8 << 20) && i % 2 == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                }
                format!("sha256:{}", hex::encode(sha2::Digest::finalize(h)))
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), digest);
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", srv.child.id())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(hwm_kib < 128 << 10, "peak RSS {} MiB", hwm_kib >> 10);
}

/// An object store behind a CA of its own, over HTTPS: reached when
/// `AWS_CA_BUNDLE` names that CA (as AWS tools read it); without it, or
/// with it naming no readable file, the store's certificate is not
/// trusted and requests fail with one line saying so — the server itself
/// keeps answering.
#[test]
fn an_object_store_behind_a_private_ca_is_trusted_by_aws_ca_bundle() {
    let work = tempfile::tempdir().unwrap();
    let ca = gantry_tests::tls::TestCa::new(work.path());
    let (cert, key) = ca.server_cert(&[], &["127.0.0.1"]);
    let Some(s3) = SeaweedFs::start_tls(&cert, &key) else {
        return;
    };
    let https = format!("https://127.0.0.1:{}", s3.https_port.unwrap());
    let config = s3.config().replace(&s3.endpoint(), &https);
    for (bundle, trusted) in [
        (Some(ca.cert()), true),
        (None, false),
        (Some(work.path().join("no-such-bundle.pem")), false),
    ] {
        let mut g = Gantry::new().with_config(&config);
        if let Some(b) = &bundle {
            g.env.push(("AWS_CA_BUNDLE".into(), b.display().to_string()));
        }
        let srv = g.serve(&[]);
        let r = ureq::post(&url(&srv, "/v2/tls/check/blobs/uploads/")).call();
        if trusted {
            let session = r.unwrap().header("Location").unwrap().to_string();
            patch(&srv, &session, 0, b"over https");
            assert_eq!(finish(&srv, &session, &sha256(b"over https")), 201);
            assert_eq!(get_blob(&srv, "tls/check", &sha256(b"over https")), b"over https");
        } else {
            let Err(ureq::Error::Status(500, resp)) = r else {
                panic!("{bundle:?}: {r:?}")
            };
            let body = resp.into_string().unwrap();
            assert!(body.to_lowercase().contains("certificate"), "{bundle:?}: {body}");
            assert!(!body.contains('\n'), "{body}");
        }
    }
}

/// The keys come as AWS tools find them when the config has none: the
/// environment's, else a profile of the shared credentials file; with
/// none at all (or wrong ones) the object store refuses, one line.
#[test]
fn object_store_keys_come_from_the_environment_or_the_shared_credentials_file() {
    let Some(s3) = SeaweedFs::start() else { return };
    let keyless: String = s3
        .config()
        .lines()
        .filter(|l| !l.starts_with("access_key") && !l.starts_with("secret_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("credentials");
    std::fs::write(
        &file,
        format!(
            "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n[registry]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            gantry_tests::s3::ACCESS_KEY,
            gantry_tests::s3::SECRET_KEY
        ),
    )
    .unwrap();
    // (what, environment, whether the store accepts the keys)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, bool);
    let cases: [Case; 4] = [
        (
            "environment",
            vec![
                ("AWS_ACCESS_KEY_ID", gantry_tests::s3::ACCESS_KEY.into()),
                ("AWS_SECRET_ACCESS_KEY", gantry_tests::s3::SECRET_KEY.into()),
            ],
            true,
        ),
        (
            "profile",
            vec![
                ("AWS_SHARED_CREDENTIALS_FILE", file.display().to_string()),
                ("AWS_PROFILE", "registry".into()),
            ],
            true,
        ),
        (
            "default profile",
            vec![("AWS_SHARED_CREDENTIALS_FILE", file.display().to_string())],
            false,
        ),
        ("none", vec![("HOME", work.path().display().to_string())], false),
    ];
    for (what, env, works) in cases {
        let mut g = Gantry::new().with_config(&keyless);
        g.env.extend(env.into_iter().map(|(k, v)| (k.to_string(), v)));
        let srv = g.serve(&[]);
        let r = ureq::post(&url(&srv, "/v2/keys/check/blobs/uploads/")).call();
        match (works, r) {
            (true, Ok(r)) => assert_eq!(r.status(), 202, "{what}"),
            (false, Err(ureq::Error::Status(500, resp))) => {
                let body = resp.into_string().unwrap();
                assert!(body.contains("object store") && !body.contains('\n'), "{what}: {body}");
            }
            (_, r) => panic!("{what}: {r:?}"),
        }
    }
}

/// With `manifest_cache_ms`, a replica answers manifests from memory: a tag
/// moved through itself shows at once, one moved through another replica
/// within the configured time (and not before the cache has expired).
#[test]
fn a_manifest_cache_shows_another_replicas_tag_within_its_time() {
    if !peers() {
        return;
    }
    let Some(s3) = SeaweedFs::start() else { return };
    let (_ga, a) = replica(&s3, "");
    let (_gb, b) = replica(&s3, "manifest_cache_ms = 8000\n");
    let work = tempfile::tempdir().unwrap();
    let served = |srv: &Server| {
        ureq::head(&url(srv, "/v2/cache/app/manifests/v1"))
            .set("Accept", "application/vnd.oci.image.manifest.v1+json")
            .call()
            .unwrap()
            .header("Docker-Content-Digest")
            .unwrap()
            .to_string()
    };
    let first = layout(&work.path().join("one"), 1, 1000);
    copy_in(&work.path().join("one"), &format!("{}/cache/app:v1", b.addr));
    assert_eq!(served(&b), first, "through itself: at once");
    let second = layout(&work.path().join("two"), 2, 1000);
    copy_in(&work.path().join("two"), &format!("{}/cache/app:v1", a.addr));
    assert_eq!(served(&a), second);
    let moved = std::time::Instant::now();
    assert_eq!(served(&b), first, "another replica's move waits for the cache");
    while served(&b) != second {
        assert!(moved.elapsed() < std::time::Duration::from_secs(9), "not within 8 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// With `redirect = true` a blob GET answers 307 to a presigned URL of the
/// object store, which gives the blob's bytes to anyone holding it; a HEAD
/// still answers from the registry, with the size.
#[test]
fn blob_gets_redirect_to_a_presigned_url_when_asked() {
    let Some(s3) = SeaweedFs::start() else { return };
    let (_g, srv) = replica(&s3, "redirect = true\n");
    let blob = b"fetched from the object store itself".to_vec();
    let digest = sha256(&blob);
    let session = start(&srv, "redirect/me");
    patch(&srv, &session, 0, &blob);
    assert_eq!(finish(&srv, &session, &digest), 201);
    let plain = ureq::AgentBuilder::new().redirects(0).build();
    let r = plain
        .get(&url(&srv, &format!("/v2/redirect/me/blobs/{digest}")))
        .call()
        .unwrap();
    assert_eq!(r.status(), 307);
    let to = r.header("Location").unwrap().to_string();
    assert!(
        to.starts_with(&s3.endpoint()) && to.contains("X-Amz-Signature="),
        "{to}"
    );
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut ureq::get(&to).call().unwrap().into_reader(), &mut got).unwrap();
    assert_eq!(got, blob);
    let head = plain
        .head(&url(&srv, &format!("/v2/redirect/me/blobs/{digest}")))
        .call()
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.header("Content-Length"), Some(blob.len().to_string().as_str()));
    // A blob of another repository is not redirected to.
    let other = plain
        .get(&url(&srv, &format!("/v2/someone/else/blobs/{digest}")))
        .call();
    assert!(matches!(other, Err(ureq::Error::Status(404, _))), "{other:?}");
}
