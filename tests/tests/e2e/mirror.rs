//! `gantry serve --mirror-of`: a pull-through cache. The first pull fills
//! it, the next is served with the upstream gone; a lying upstream leaves
//! nothing cached; two clients missing the same blob cause one upstream
//! fetch; it answers as docker-registry's own proxy mode does.

use crate::{control_image, peers, publish};
use gantry_tests::gantry::Gantry;
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
    let mirror_store = Gantry::new();
    let srv = mirror_store.serve(&["--mirror-of", &format!("http://{}", liar.addr())]);
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
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET /v2/test/app/blobs/{bad} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let split = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(got.len());
    assert_ne!(gantry_tests::image::sha256(&got[split..]), bad);
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
    let mirror_store = Gantry::new();
    let srv = mirror_store.serve(&["--mirror-of", &format!("http://{}", slow.addr())]);
    let fetch = |addr: String, blob: String| {
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            write!(
                s,
                "GET /v2/test/app/blobs/{blob} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let split = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            gantry_tests::image::sha256(&got[split..])
        })
    };
    let a = fetch(srv.addr.clone(), blob.clone());
    std::thread::sleep(Duration::from_millis(100));
    let b = fetch(srv.addr.clone(), blob.clone());
    assert_eq!(a.join().unwrap(), blob);
    assert_eq!(b.join().unwrap(), blob);
    assert_eq!(slow.seen.lock().unwrap().blob_gets.get(&blob).copied(), Some(1));
    // And a ranged request is served from the cache.
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    write!(
        s,
        "GET /v2/test/app/blobs/{blob} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 206"), "{got}");
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
    let mirror_store = Gantry::new();
    let srv = mirror_store.serve(&["--mirror-of", &format!("http://{}", upstream.addr())]);
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
