//! Registries that demand tokens, redirect, cut connections or send wrong bytes.

use crate::{assert_refused, control_image, control_store, docker_config, peers, publish};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{rich_layers, Image};
use gantry_tests::proxy::{Faults, Proxy};
use gantry_tests::registry::Registry;

#[test]
fn token_auth_with_credentials_from_docker_config() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    let proxy = Proxy::alice_only(reg.port);
    let name = format!("{}/test/rich:v1", proxy.addr());

    let mut g = Gantry::new();
    let cfg = docker_config(&g, &proxy.addr(), "alice", "wrong");
    g.env.push(("DOCKER_CONFIG".into(), cfg.display().to_string()));
    g.ok(&["images"]);
    assert_refused(&g, &["pull", &name], "unauthorized");

    let mut g = Gantry::new();
    let cfg = docker_config(&g, &proxy.addr(), "alice", "s3cret");
    g.env.push(("DOCKER_CONFIG".into(), cfg.display().to_string()));
    g.ok(&["pull", &name]);
    assert!(proxy.seen.lock().unwrap().tokens_issued >= 1);
    g.fsck_clean();
}

#[test]
fn redirected_blobs_never_carry_the_registry_token() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    let proxy = Proxy::start(
        reg.port,
        Faults {
            token_auth: true,
            redirect_blobs: true,
            ..Default::default()
        },
    );
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/rich:v1", proxy.addr())]);
    let seen = proxy.seen.lock().unwrap();
    assert!(seen.cdn_gets >= 4, "config and layers came from the redirect target");
    assert!(
        seen.cdn_authorization.is_empty(),
        "token leaked: {:?}",
        seen.cdn_authorization
    );
    drop(seen);
    g.fsck_clean();
}

/// The rich image in a registry, behind a proxy that cuts its largest blob
/// half way the first time (and, with `ignore_range`, cannot resume).
fn rich_behind_a_cut(ignore_range: bool) -> (Registry, crate::Published, gantry_tests::image::Desc, Proxy) {
    let reg = Registry::start();
    let (p, _, layers) = publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    let big = layers.iter().max_by_key(|l| l.size).unwrap().clone();
    let proxy = Proxy::start(
        reg.port,
        Faults {
            cut_blob: Some((big.digest.clone(), big.size / 2)),
            ignore_range,
            ..Default::default()
        },
    );
    (reg, p, big, proxy)
}

#[test]
fn a_cut_connection_is_resumed_with_a_range_request() {
    if !peers() {
        return;
    }
    let (_reg, _p, big, proxy) = rich_behind_a_cut(false);
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/rich:v1", proxy.addr())]);
    let seen = proxy.seen.lock().unwrap();
    assert!(seen.range_requests >= 1, "the download resumed with Range");
    assert_eq!(seen.blob_gets[&big.digest], 2);
    drop(seen);
    g.fsck_clean();
}

/// A registry that cannot resume: the cut download starts over from zero
/// while its layer is being applied from the bytes that arrived; the apply
/// starts over too, from the finished download, and the image is whole.
#[test]
fn a_download_that_starts_over_is_applied_again_from_the_finished_blob() {
    if !peers() {
        return;
    }
    let (_reg, _p, big, proxy) = rich_behind_a_cut(true);
    let g = Gantry::new();
    let name = format!("{}/test/rich:v1", proxy.addr());
    g.ok(&["pull", &name]);
    let seen = proxy.seen.lock().unwrap();
    assert_eq!(seen.blob_gets[&big.digest], 3, "cut, refused range, whole again");
    drop(seen);
    g.fsck_clean();
    g.ok(&["fsck", "--verify-content"]);
    crate::assert_export_matches_umoci(&g, &name, _p.dir.path(), "v1");
}

#[test]
fn wrong_bytes_are_rejected_and_nothing_is_registered() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let (_p, _, layers) = publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    publish(&reg, "test/control", "v1", &control_image());
    let proxy = Proxy::start(
        reg.port,
        Faults {
            corrupt_blob: Some(layers[1].digest.clone()),
            ..Default::default()
        },
    );
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/control:v1", proxy.addr())]);
    assert_refused(
        &g,
        &["pull", &format!("{}/test/rich:v1", proxy.addr())],
        "digest mismatch",
    );
}

#[test]
fn registry_errors_give_one_line_and_leave_the_store_alone() {
    let Some((reg, g)) = control_store() else {
        return;
    };
    assert_refused(
        &g,
        &["pull", &format!("{}/test/control:nope", reg.addr())],
        "manifest for test/control:nope not found: manifest unknown",
    );
    assert_refused(&g, &["pull", &format!("{}/test/absent:v1", reg.addr())], "not found");
    for (status, expect) in [(500u16, "HTTP 500"), (401, "unauthorized"), (403, "HTTP 403")] {
        let proxy = Proxy::start(
            reg.port,
            Faults {
                manifest_status: Some(status),
                ..Default::default()
            },
        );
        assert_refused(&g, &["pull", &format!("{}/test/control:v1", proxy.addr())], expect);
    }
    let proxy = Proxy::start(
        reg.port,
        Faults {
            huge_manifest: Some(5 << 20),
            ..Default::default()
        },
    );
    assert_refused(
        &g,
        &["pull", &format!("{}/test/control:v1", proxy.addr())],
        "larger than 4 MiB",
    );
    assert_refused(&g, &["pull", "Not/A/Valid:ref!"], "invalid reference format");
    assert_refused(&g, &["pull", "127.0.0.1:1/nothing/listens:here"], "127.0.0.1:1");
}

#[test]
fn mirrors_come_first_and_fall_back_to_the_registry() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let (_p, manifest, _) = publish(&reg, "test/control", "v1", &control_image());
    let config = |mirror: u16| {
        format!(
            "[transport]\ntype = \"v2\"\n[driver]\ntype = \"auto\"\n[registries.\"{}\"]\nmirrors = [\"http://127.0.0.1:{mirror}\"]\n",
            reg.addr()
        )
    };
    // A mirror that has the image serves it.
    let good = Proxy::start(reg.port, Faults::default());
    let g = Gantry::new().with_config(&config(good.port));
    g.ok(&["pull", &format!("{}/test/control:v1", reg.addr())]);
    assert!(
        !good.seen.lock().unwrap().blob_gets.is_empty(),
        "the mirror served the blobs"
    );
    // A mirror that misses falls back to the registry; so does a dead one.
    let missing = Proxy::start(
        reg.port,
        Faults {
            manifest_status: Some(404),
            ..Default::default()
        },
    );
    let g = Gantry::new().with_config(&config(missing.port));
    g.ok(&["pull", &format!("{}/test/control@{}", reg.addr(), manifest.digest)]);
    assert!(missing.seen.lock().unwrap().blob_gets.is_empty());
    let inspect: serde_json::Value =
        serde_json::from_str(&g.ok(&["inspect", &format!("{}/test/control@{}", reg.addr(), manifest.digest)])).unwrap();
    assert_eq!(inspect[0]["RepoTags"], serde_json::json!([]));
    let dead = gantry_tests::registry::free_port();
    let g = Gantry::new().with_config(&config(dead));
    g.ok(&["pull", &format!("{}/test/control:v1", reg.addr())]);
    g.fsck_clean();
    // A digest that does not match what the registry serves is refused.
    let wrong = format!("{}/test/control@sha256:{}", reg.addr(), "0".repeat(64));
    let g = Gantry::new();
    g.ok(&["images"]);
    assert_refused(&g, &["pull", &wrong], "not found");
}

/// What a registry says is untrusted: an error body with terminal escapes
/// and line breaks reaches the terminal escaped, on one line; a manifest
/// that is also an index (CVE-2021-41190) is refused; a redirect to a
/// link-local address (a cloud's metadata service) is not followed, even
/// from a registry on loopback (which may redirect within internal
/// networks: `pull.rs`).
/// A mirror that keeps failing is skipped for a while, remembered in the
/// store across processes, instead of being waited on at every pull; once
/// the while is over it is tried again.
#[test]
fn a_failing_mirror_is_skipped_for_a_while() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/control", "v1", &control_image());
    let failing = Proxy::start(
        reg.port,
        Faults {
            manifest_status: Some(503),
            ..Default::default()
        },
    );
    let g = Gantry::new().with_config(&format!(
        "mirror_backoff_seconds = 3\n[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n[registries.\"{}\"]\nmirrors = [\"http://127.0.0.1:{}\"]\n",
        Gantry::test_driver(),
        reg.addr(),
        failing.port
    ));
    let name = format!("{}/test/control:v1", reg.addr());
    let asked = || failing.seen.lock().unwrap().requests;
    let started = std::time::Instant::now();
    g.ok(&["pull", &name]);
    let first = asked();
    assert!(first >= 1, "the mirror was tried first");
    // A second process, within the while: the mirror is not asked at all.
    g.ok(&["pull", &name]);
    assert_eq!(asked(), first, "a mirror that just failed was asked again");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "the test machine is too slow for its window"
    );
    // After it, the mirror is tried again.
    std::thread::sleep(std::time::Duration::from_secs(4));
    g.ok(&["pull", &name]);
    assert!(asked() > first, "the mirror was never tried again");
    g.fsck_clean();
}

#[test]
fn hostile_registry_answers_are_refused_and_quoted_safely() {
    let Some((reg, g)) = control_store() else {
        return;
    };
    publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    let escapes = Proxy::start(
        reg.port,
        Faults {
            manifest_error_body: Some((500, b"\x1b[2J\x1b]0;owned\x07oops\nsecond line\r\x9b31m".to_vec())),
            ..Default::default()
        },
    );
    let err = assert_refused(&g, &["pull", &format!("{}/test/rich:v1", escapes.addr())], "oops");
    assert!(!err.chars().any(|c| c.is_control()), "{err:?}");
    assert!(err.contains("\\u{1b}[2J") && err.contains("\\r"), "{err}");

    let ambiguous = Proxy::start(
        reg.port,
        Faults {
            ambiguous_manifest: true,
            ..Default::default()
        },
    );
    assert_refused(
        &g,
        &["pull", &format!("{}/test/rich:v1", ambiguous.addr())],
        "CVE-2021-41190",
    );

    let internal = Proxy::start(
        reg.port,
        Faults {
            redirect_to: Some("http://169.254.169.254".into()),
            ..Default::default()
        },
    );
    assert_refused(
        &g,
        &["pull", &format!("{}/test/rich:v1", internal.addr())],
        "is an internal address",
    );
    // The redirect named a presigned URL: its signature is not shown.
    let err = g.fails(&["pull", &format!("{}/test/rich:v1", internal.addr())]);
    assert!(err.contains("?…") && !err.contains("s3cret-signature"), "{err}");
}
